"""Adaptive max pooling for CPU meta-learning: ``F.adaptive_max_pool2d`` with a fast forward.

A Relation Network's module (Sung et al. 2018, as easyfsl builds it) pools every
(query, class) pair with ``AdaptiveMaxPool2d((5, 5))`` and ``AdaptiveMaxPool2d((1, 1))``.
PyTorch's CPU kernel for NCHW inputs is slow there: on ``[375, 64, 7, 7]`` (one task's
75 queries x 5 classes), 1 thread, it took 29 ms against 1.9 ms for its channels-last
kernel, and 17% of a whole RelationNet meta-step (torch.profiler). The forward of
:func:`adaptive_max_pool2d`, the custom op ``pymeta::adaptive_max_pool2d`` (made by
:class:`pymeta.ops._factory.FusedOp`), runs the C++ kernel ``pymeta_cpu::adaptive_max_pool2d``
(``csrc/adaptive_max_pool2d.cpp``: 8 planes at a time, one per vector lane, on the NCHW
planes in place; 2.8 ms there, ``benchmarks/bench_max_pool2d.py``), else (and without the
C++ extension) its reference, ATen's channels-last kernel with a layout round trip. The
backward, ``pymeta::adaptive_max_pool2d_backward``, adds each gradient at its index in
ATen's order (C++ kernel, or ``scatter_add`` when a graph of it is being built). Values,
gradients and double gradients are exactly ``F.adaptive_max_pool2d``'s (same windows and
scan order, first maximum wins ties, NaN propagated the same way). Autograd keeps only
int32 indices for the backward, not the input (see :func:`_setup_context`).

Used wherever :func:`pymeta.ops.max_pool2d` is (the ``"loop"`` and ``"lowered"``
strategies, :mod:`pymeta.core.norms`, :mod:`pymeta.core.lowered`); any case outside the
fast path (non-4-D, GPU, returned indices, under ``torch.compile``) calls
``F.adaptive_max_pool2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _list_with_default, _pair

from pymeta.ops._factory import FusedOp
from pymeta.ops.max_pool2d import not_supported, save_indices


def adaptive_max_pool2d(input: Tensor, output_size: Any, return_indices: bool = False) -> Tensor:
    """``F.adaptive_max_pool2d`` with the same signature; ``input: [N, C, H, W]`` -> ``[N, C, *output_size]``."""
    fast = (
        not torch.compiler.is_compiling()  # a compiler generates its own pooling loop
        and input.device.type == "cpu" and input.dim() == 4 and input.is_floating_point()
        and not return_indices and 0 < input.shape[-2:].numel() <= torch.iinfo(torch.int32).max
    )  # fmt: skip
    if not fast:
        return F.adaptive_max_pool2d(input, output_size, return_indices)
    return _OP(input, _list_with_default(_pair(output_size), input.shape))[0]


def reference_forward(input: Tensor, output_size: list[int]) -> tuple[Tensor, Tensor]:
    """``(out, indices)``, both NCHW, of ``input: [N, C, H, W]``: ATen's channels-last
    kernel; ``indices`` int32 positions in each ``[H, W]`` plane (see :func:`_setup_context`)."""
    # Indices are positions in each [H, W] plane, independent of the memory layout.
    out, indices = torch.ops.aten.adaptive_max_pool2d(input.contiguous(memory_format=torch.channels_last), output_size)
    return out.contiguous(), indices.to(torch.int32, memory_format=torch.contiguous_format)


def reference_backward(grad: Tensor, indices: Tensor, input_size: list[int]) -> Tensor:
    """``grad_input: [N, C, *input_size]`` of ``grad: [N, C, OH, OW]``: each gradient added at
    its index (windows may overlap); differentiable in ``grad`` (a gather by the indices)."""
    N, C = grad.shape[:2]
    plane = grad.new_zeros(N, C, input_size[0] * input_size[1])
    return plane.scatter_add(2, indices.long().flatten(2), grad.flatten(2)).view(N, C, *input_size)


def _fake(input: Tensor, output_size: list[int]) -> tuple[Tensor, Tensor]:
    shape = [*input.shape[:2], *output_size]
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


def _backward_fake(grad: Tensor, indices: Tensor, input_size: list[int]) -> Tensor:
    return grad.new_empty(*grad.shape[:2], *input_size)


def _check(input: Tensor, output_size: list[int]) -> None:
    if len(output_size) != 2 or min(output_size) < 1:
        raise ValueError(f"output_size must be 2 sizes >= 1, got {output_size}")


def _setup_context(ctx: Any, inputs: tuple[Tensor, list[int]], output: tuple[Tensor, Tensor]) -> None:
    # Only the indices (int32: half of ATen's int64 ones) and the input's shape: with
    # int64 indices and the saved input, the two were a RelationNet step's peak memory
    # above easyfsl's half.
    save_indices(ctx, inputs[0], output)


def _vjp(ctx: Any, grad_out: Tensor | None, _: None) -> tuple[Tensor | None, None]:
    if grad_out is None:
        return None, None
    (indices,) = ctx.saved_tensors
    return _OP.backward(grad_out, indices, list(ctx.input_shape[-2:])), None


_OP = FusedOp(
    "adaptive_max_pool2d", reference_forward, fake=_fake, check=_check,
    backward=reference_backward, backward_fake=_backward_fake,
    setup_context=_setup_context, vjp=_vjp,
    not_supported=not_supported, backward_not_supported=not_supported,
    kernels=("cpp",),
    fold_tasks=True,  # images are independent: a vmapped dim folds into N
)
