"""An image model's first block in one pass: convolution, BatchNorm, ReLU, 2x2 max-pool.

The first block of conv4 (``Conv2d(1 or 3, 64, 3, padding=1) -> BatchNorm2d -> ReLU ->
MaxPool2d(2)``) turns a few input channels into the largest activation of the network:
``[75, 64, 28, 28]`` (15 MB) from ``[75, 1, 28, 28]`` Omniglot queries. Computing it
takes 9 multiply-adds per value; separately, it is written to memory, read back for
BatchNorm and pooling and again in the backward, with a gradient of the same size
written and read for the weight gradient. This op never writes either, which takes
conv4 MAML's peak memory from 40 to 17 MiB; its time is about that of the separate
kernels (the BatchNorm + pooling backward's window loops are most of the block). It
computes::

    conv2d_batch_norm_relu_pool(x [B, G*Ci, H, W], conv_weight [G*Co, Ci, kh, kw], conv_bias,
                                weight, bias, running_mean, running_var, eps, padding, groups)
        = batch_norm_relu_pool(conv2d(x, conv_weight, conv_bias, padding=padding, groups=groups),
                               weight, bias, running_mean, running_var, eps)   # [B, G*Co, Ho/2, Wo/2]

(stride 1; :func:`pymeta.ops.batch_norm_relu_pool` has the BatchNorm modes). The C++
kernel (``csrc/conv2d_batch_norm_relu_pool.cpp``) runs channel by channel: the
channel's convolution into a buffer in the L2 cache, BatchNorm + ReLU + pooling from
there, and in the backward the same convolution again, the BatchNorm + pooling gradient
and at once the convolution's weight gradient. The convolution's output and its
gradient never reach memory; the backward saves only the images and the output.

Its backward is first order (what a query set needs). When a graph of the backward is
built (the support set of second-order MAML, ``create_graph=True``), the backward is
the two ops it fuses: :func:`pymeta.ops.grouped_conv2d` recomputed, the backward op of
:func:`pymeta.ops.batch_norm_relu_pool` and ``grouped_conv2d``'s weight gradient, each
differentiable with kernels of its own. The images get no gradient from the fused
kernel: when they need one, :func:`conv2d_batch_norm_relu_pool` runs the two ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from pymeta import _validate
from pymeta.ops._factory import FusedOp
from pymeta.ops.batch_norm_relu_pool import _BACKWARD as BATCH_NORM_RELU_POOL_BACKWARD
from pymeta.ops.batch_norm_relu_pool import _OP as BATCH_NORM_RELU_POOL
from pymeta.ops.batch_norm_relu_pool import channel_param, checked_norm_parameters
from pymeta.ops.grouped_conv2d import _INPUT_GRAD as CONV_INPUT_GRAD
from pymeta.ops.grouped_conv2d import _WEIGHT_GRAD as CONV_WEIGHT_GRAD
from pymeta.ops.grouped_conv2d import grouped_conv2d, tap_loops_slower

_ONES = [1, 1]  # stride and dilation: the kernel's


def reference_forward(
    x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, weight: Tensor, bias: Tensor,
    running_mean: Tensor | None, running_var: Tensor | None, eps: float, padding: list[int], groups: int,
) -> Tensor:
    """The two ops: ``[B, G*Ci, H, W]`` -> ``[B, G*Co, Ho // 2, Wo // 2]``."""
    y = grouped_conv2d(x, conv_weight, conv_bias, 1, padding, 1, groups)
    return BATCH_NORM_RELU_POOL(y, weight, bias, running_mean, running_var, eps)


def _two_op_grads(
    grad: Tensor, x: Tensor, out: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, weight: Tensor, bias: Tensor,
    running_mean: Tensor | None, running_var: Tensor | None, eps: float, padding: list[int], groups: int,
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """``(grad x or None, grad conv_weight, grad conv_bias, grad weight, grad bias)``
    through the two ops' own backward ops (differentiable, each with its kernels)."""
    options = (_ONES, padding, _ONES, groups)
    y = grouped_conv2d(x, conv_weight, conv_bias, 1, padding, 1, groups)
    gy, g_weight, g_bias = BATCH_NORM_RELU_POOL_BACKWARD(grad, y, out, weight, bias, running_mean, running_var, eps)
    gx = CONV_INPUT_GRAD(gy, x, conv_weight, *options) if need_x else None
    return gx, CONV_WEIGHT_GRAD(gy, x, conv_weight, *options), gy.sum((0, 2, 3)), g_weight, g_bias


def reference_backward(
    grad: Tensor, x: Tensor, out: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, weight: Tensor, bias: Tensor,
    running_mean: Tensor | None, running_var: Tensor | None, eps: float, padding: list[int], groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad conv_weight, grad conv_bias, grad weight, grad bias)`` from ``grad: [B, G*Co, Ho // 2, Wo // 2]``
    (grad conv_bias also without a conv_bias); differentiable (see the module docstring)."""
    return _two_op_grads(grad, x, out, conv_weight, conv_bias, weight, bias, running_mean, running_var, eps, padding,
                         groups, need_x=False)[1:]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    *tensors, ctx.eps, ctx.padding, ctx.groups = inputs
    ctx.save_for_backward(*tensors, output)


def _vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, conv_weight, conv_bias, weight, bias, running_mean, running_var, out = ctx.saved_tensors
    arguments = (grad, x, out, conv_weight, conv_bias, weight, bias, running_mean, running_var, ctx.eps, ctx.padding,
                 ctx.groups)
    if ctx.needs_input_grad[0]:  # the op called directly (the public function runs the two ops then)
        gx, *grads = _two_op_grads(*arguments, need_x=True)
    else:
        gx, grads = None, _OP.backward(*arguments)
    g_conv_weight, g_conv_bias, g_weight, g_bias = grads
    return gx, g_conv_weight, None if conv_bias is None else g_conv_bias, g_weight, g_bias, None, None, None, None, None


def _conv_shape(x_shape: Any, w_shape: Any, padding: list[int]) -> list[int]:
    """``[B, G*Co, Ho, Wo]``: the stride-1 convolution's output, padded by ``padding``."""
    return [x_shape[0], w_shape[0], *(x_shape[2 + i] + 2 * padding[i] - w_shape[2 + i] + 1 for i in range(2))]


def _output_shape(x: Tensor, conv_weight: Tensor, padding: list[int]) -> tuple[int, int, int, int]:
    """``[B, G*Co, Ho // 2, Wo // 2]``: the op's pooled output."""
    B, C, Ho, Wo = _conv_shape(x.shape, conv_weight.shape, padding)
    return B, C, Ho // 2, Wo // 2


def _fake(x: Tensor, conv_weight: Tensor, *rest: Any) -> Tensor:
    padding = rest[-2]
    return x.new_empty(_output_shape(x, conv_weight, padding))


def _backward_fake(grad: Tensor, x: Tensor, out: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                   weight: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (conv_weight.new_empty(conv_weight.shape), *(weight.new_empty(weight.shape) for _ in range(3)))


def _not_supported(backend: str, first: Tensor, *_: Any) -> str | None:
    """Forward and backward: their tensors all have x's dtype."""
    if first.dtype not in (torch.float32, torch.float64):
        return f"the {backend} kernels take float32 and float64, not {first.dtype}"
    return None


def _slower(backend: str, x: Tensor, conv_weight: Tensor, *_: Any) -> str | None:
    return tap_loops_slower(conv_weight)


_OP = FusedOp(
    "conv2d_batch_norm_relu_pool", reference_forward, fake=_fake,
    backward=reference_backward, backward_fake=_backward_fake,
    setup_context=_setup_context, vjp=_vjp,
    not_supported=_not_supported, backward_not_supported=_not_supported, slower=_slower,
    kernels=("cpp",),
)


# FLOP formulas (torch.utils.flop_counter): the convolution's, as grouped_conv2d's forward
# and weight gradient count them (the backward's recomputed convolution is not counted,
# as the separate ops would not run it; BatchNorm and pooling count 0, as ATen's do).
def _conv_flops(x_shape: Any, w_shape: Any, padding: list[int]) -> int:
    return conv_flop_count(x_shape, w_shape, _conv_shape(x_shape, w_shape, padding), transposed=False)


@register_flop_formula(torch.ops.pymeta.conv2d_batch_norm_relu_pool)
def _forward_flops(x_shape: Any, w_shape: Any, *rest: Any, out_shape: Any = None, **__: Any) -> int:
    return _conv_flops(x_shape, w_shape, rest[-2])


@register_flop_formula(torch.ops.pymeta.conv2d_batch_norm_relu_pool_backward)
def _backward_flops(grad_shape: Any, x_shape: Any, pooled_shape: Any, w_shape: Any, *rest: Any, **__: Any) -> int:
    return _conv_flops(x_shape, w_shape, rest[-2])


def conv2d_batch_norm_relu_pool(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    eps: float = 1e-5,
    padding: Any = 0,
    groups: int = 1,
) -> Tensor:
    """``batch_norm_relu_pool(F.conv2d(x, conv_weight, conv_bias, padding=padding, groups=groups), ...)``
    in one pass (see the module docstring).

    Args:
        x: ``[B, groups * Ci, H, W]`` images.
        conv_weight: ``[groups * Co, Ci, kh, kw]``; conv_bias: ``[groups * Co]`` or None.
        weight, bias: BatchNorm's affine parameters ``[groups * Co]``; None: 1 and 0.
        running_mean, running_var: ``[groups * Co]``: normalise with them (eval mode);
            None (both): with the batch's statistics (train mode), as
            :func:`pymeta.ops.batch_norm_relu_pool`.
        eps: BatchNorm's ``eps``.
        padding: zero padding, an int or a pair (stride and dilation are 1).
        groups: as ``F.conv2d``'s.

    Returns:
        ``[B, groups * Co, Ho // 2, Wo // 2]`` (``Ho = H + 2 * padding - kh + 1``, alike
        ``Wo``), differentiable w.r.t. every tensor but the running statistics, to any order.
    """
    _validate.floating("x", x)
    _validate.ndim("x", x, 4, "[B, groups * Ci, H, W]")
    _validate.ndim("conv_weight", conv_weight, 4, "[groups * Co, Ci, kh, kw]")
    _validate.same_dtype(("x", "conv_weight"), x, conv_weight)
    groups = _validate.positive_int("groups", groups)
    padding = [int(p) for p in _pair(padding)]
    if len(padding) != 2 or min(padding) < 0:
        raise ValueError(f"padding must be an int or a pair of ints >= 0, got {padding}")
    if conv_weight.shape[0] % groups or x.shape[1] != groups * conv_weight.shape[1]:
        raise ValueError(
            f"x [B, groups * Ci, H, W] and conv_weight [groups * Co, Ci, kh, kw] do not match with groups={groups}: "
            f"got shapes {tuple(x.shape)} and {tuple(conv_weight.shape)}"
        )
    if min(_output_shape(x, conv_weight, padding)[2:]) < 1:
        raise ValueError(f"the convolution's output {tuple(x.shape)} * {tuple(conv_weight.shape)} (padding {padding}) "
                         "is smaller than 2x2, the pooling window")
    C = conv_weight.shape[0]
    conv_bias = None if conv_bias is None else channel_param("conv_bias", conv_bias, x, 0.0, C)
    weight, bias, running_mean, running_var, eps = checked_norm_parameters(
        x, weight, bias, running_mean, running_var, eps, C
    )
    if x.requires_grad:  # the fused backward gives the images no gradient: the two ops do
        return reference_forward(x, conv_weight, conv_bias, weight, bias, running_mean, running_var, eps, padding, groups)
    return _OP(x, conv_weight, conv_bias, weight, bias, running_mean, running_var, eps, padding, groups)
