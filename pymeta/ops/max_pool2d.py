"""Max pooling for CPU meta-learning: a fast kernel for each direction.

PyTorch's CPU ``max_pool2d`` (with indices, as autograd needs) is slow for NCHW inputs
and fast for channels-last ones, and its backward is the other way round (measured
on conv4 activations ``[75, 64, 28, 28]``, 1 thread: NCHW forward ~4x slower than
channels-last; channels-last backward ~5x slower than NCHW). In a conv4 MAML step the
NCHW forward alone was a quarter of the time. :func:`max_pool2d`'s forward, the custom
op ``pymeta::max_pool2d`` (made by :class:`pymeta.ops._factory.FusedOp`), runs the C++
kernel ``pymeta_cpu::max_pool2d`` (``csrc/max_pool2d.cpp``) on the NCHW planes in
place when they are at least :data:`CPP_MIN_WIDTH` wide, else (and without the C++
extension) its reference, ATen's channels-last kernel with a layout round trip; the
backward is ATen's NCHW one. All share the indices, so values, gradients and double gradients
are exactly ``F.max_pool2d``'s (same window scan order, same first-maximum rule for
ties, NaN propagated the same way).

Forward of ``[75, 64, 28, 28]``, 1 thread (``benchmarks/bench_max_pool2d.py``): C++
2.3 ms, channels-last round trip 6.1 ms, ATen NCHW 18 ms. At 14x14 planes the round
trip is already slightly faster (1.27 vs 1.37 ms) and at 7x7 clearly (0.17 vs 0.53 ms:
a short plane is too short a loop), hence :data:`CPP_MIN_WIDTH`.

As a custom op (for ``torch.compile``'s fake tensors, a vmap rule, ``opcheck`` and the
backend record of :func:`pymeta.ops.usage`) it costs a fixed ~40 us more per forward call
and ~100 us more per forward + backward than the plain ``autograd.Function`` it replaced
(the dispatcher and two Python kernels; 1 thread, tiny planes, thread CPU time). On conv4
activations that is noise: ``[75, 64, 28, 28]`` forward + backward 0.97x the old time, a
conv4 second-order MAML meta-step (8 tasks, ``lowered``) 1.03x with a +-7% spread between
runs (old and new trees alternated, 4 runs each).

Used by the ``"loop"`` and ``"lowered"`` strategies for CPU tensors (see
:mod:`pymeta.core.norms`, :mod:`pymeta.core.lowered`); any case outside the fast path
(padding, dilation, ceil_mode, non-4-D, GPU, returned indices) calls ``F.max_pool2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from pymeta.ops._factory import FusedOp

# Narrower planes pool faster through ATen's channels-last kernel (see above).
CPP_MIN_WIDTH = 16


def max_pool2d(
    input: Tensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor:
    """``F.max_pool2d`` with the same signature; ``input: [N, C, H, W]`` -> ``[N, C, H', W']``."""
    stride = kernel_size if stride is None or stride == [] else stride
    fast = (
        not torch.compiler.is_compiling()  # a compiler generates its own pooling loop
        and input.device.type == "cpu" and input.dim() == 4 and input.is_floating_point()
        and input.is_contiguous() and not return_indices and not ceil_mode
        and _pair(padding) == (0, 0) and _pair(dilation) == (1, 1)
    )  # fmt: skip
    if not fast:
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _OP(input, list(_pair(kernel_size)), list(_pair(stride)))[0]


def reference_forward(input: Tensor, kernel: list[int], stride: list[int]) -> tuple[Tensor, Tensor]:
    """``(out, indices)``, both NCHW, of ``input: [N, C, H, W]``: ATen's channels-last kernel."""
    # Indices are positions in each [H, W] plane, independent of the memory layout.
    out, indices = torch.ops.aten.max_pool2d_with_indices(
        input.contiguous(memory_format=torch.channels_last), kernel, stride, [0, 0], [1, 1], False
    )
    return out.contiguous(), indices.contiguous()


def _fake(input: Tensor, kernel: list[int], stride: list[int]) -> tuple[Tensor, Tensor]:
    shape = [*input.shape[:2], *((n - k) // s + 1 for n, k, s in zip(input.shape[2:], kernel, stride, strict=True))]
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.long)


def not_supported(backend: str, input: Tensor, *window: list[int]) -> str | None:
    """The C++ pooling kernels' dtype rule (shared with :mod:`pymeta.ops.adaptive_max_pool2d`)."""
    if input.dtype not in (torch.float32, torch.float64):
        return f"the C++ kernel takes float32 and float64, got {input.dtype}"
    return None


def _slower(backend: str, input: Tensor, kernel: list[int], stride: list[int]) -> str | None:
    if input.shape[-1] < CPP_MIN_WIDTH:
        return f"planes narrower than {CPP_MIN_WIDTH} pool faster through ATen's channels-last kernel"
    return None


def save_indices(ctx: Any, input: Tensor, output: tuple[Tensor, Tensor]) -> None:
    """Autograd context of a pooling op returning ``(out, indices)`` (shared with
    :mod:`pymeta.ops.adaptive_max_pool2d`): the indices saved, no gradient of (or for)
    them, and ``ctx.input_shape``. Not the input: the backward is a scatter by the indices
    and needs only its shape (:func:`_input_like`), and saving it would keep the whole
    unpooled activation alive until the backward (in a Relation Network's module, the
    ``[Q * N, C, H, W]`` pairs: 4.7 MB per task of the benchmark's episodes)."""
    ctx.save_for_backward(output[1])
    ctx.input_shape = input.shape
    ctx.mark_non_differentiable(output[1])
    # No zero-filled "gradient" of the indices output (an integer tensor of the output's size).
    ctx.set_materialize_grads(False)


def _input_like(ctx: Any, grad_out: Tensor) -> Tensor:
    """A stand-in for the input of :func:`save_indices`: ATen's pooling backwards read only
    its shape and layout. One element expanded to the shape (all strides 0), so it costs
    no memory (a full-size empty tensor made the backward itself the step's peak); its
    layout reads as not channels-last, so the gradient comes back NCHW, as for the real
    input (tests/test_max_pool2d.py compares gradients with ``F.max_pool2d``'s)."""
    return grad_out.new_empty(()).expand(ctx.input_shape)


def _setup_context(ctx: Any, inputs: tuple[Tensor, list[int], list[int]], output: tuple[Tensor, Tensor]) -> None:
    input, ctx.kernel, ctx.stride = inputs
    save_indices(ctx, input, output)


def _vjp(ctx: Any, grad_out: Tensor | None, _: None) -> tuple[Tensor | None, None, None]:
    if grad_out is None:
        return None, None, None
    (indices,) = ctx.saved_tensors
    # NCHW backward (fast); differentiable in grad_out when a graph is being built,
    # so second-order meta-gradients flow through it (ATen's gather by indices).
    grad = torch.ops.aten.max_pool2d_with_indices_backward(
        grad_out.contiguous(), _input_like(ctx, grad_out), ctx.kernel, ctx.stride, [0, 0], [1, 1], False, indices
    )
    return grad, None, None


_OP = FusedOp(
    "max_pool2d", reference_forward, fake=_fake,
    setup_context=_setup_context, vjp=_vjp,
    not_supported=not_supported, slower=_slower,
    kernels=("cpp",),
    fold_tasks=True,  # images are independent: a vmapped dim folds into N
)


def window_choices(input: Tensor, kernel: list[int], stride: list[int]) -> tuple[Tensor, Tensor]:
    """``(out, indices)`` of ``input: [N, C, H, W]`` (contiguous, float32/float64, no
    padding), by the kernels above, for callers that route gradients by the indices
    themselves (:mod:`pymeta.ops.batch_norm_relu_pool`'s differentiable backward)."""
    return _OP(input, kernel, stride)
