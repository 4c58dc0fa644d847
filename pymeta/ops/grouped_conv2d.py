"""A grouped 2-D convolution whose double backward runs no per-group loop.

The ``"lowered"`` strategy runs a conv layer of T tasks as one convolution with the
tasks as groups (:mod:`pymeta.core.lowered`). Second-order MAML differentiates that
convolution twice, and ATen's double backward of a grouped convolution
(``_convolution_double_backward`` in PyTorch's ``FunctionsManual.cpp``) computes its
weight-gradient term one group at a time: a slice, a convolution and a copy per task
per layer. Under ``torch.compile`` each one is traced into the graph, where Inductor
generated C++ kernels per task (conv4 at 32 tasks: 153 kernels, against 52 at one).

This op is ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``. Its
backward is ATen's ``convolution_backward`` (one oneDNN call per gradient), as two ops
of its own, ``grouped_conv2d_input_grad`` and ``grouped_conv2d_weight_grad``, whose
derivatives are again single (grouped) convolutions and convolution backwards. With
``gO = grad``, ``gx = input_grad(gO, w)``, ``gw = weight_grad(gO, x)``, both linear in
each argument, and ``ggx``, ``ggw`` the gradients flowing back into them::

    input_grad:   d gO = conv2d(ggx, w)            d w = weight_grad(gO, ggx)
    weight_grad:  d gO = conv2d(x, ggw)            d x = input_grad(gO, ggw)

(the first-order identities of a convolution, read in the other direction; ``conv2d``
is this op again, so a compiled graph holds no ``aten.convolution``, for which Inductor
generates a layout-conversion kernel per input).

Kernels: ATen's convolution is the reference. On CPU (``csrc/grouped_conv2d.cpp``):

- the forward and the weight gradient of a stride-1 convolution with at most
  :data:`MAX_KERNEL_INPUT_CHANNELS` input channels per group (an image model's first
  layer) run loops over the taps: oneDNN is slow there (conv4 on ``[75, 1, 28, 28]``
  Omniglot images, 1 thread: weight gradient 11-22 ms for 68 MFLOP, against 2.5-3 ms);
- all three of a 3x3 stride-1 convolution with at least :data:`WINOGRAD_MIN_CHANNELS`
  input channels per group (padding <= 2, outputs at least :data:`WINOGRAD_MIN_OUTPUT`
  wide and high) run Winograd's F(2x2, 3x3)
  (``csrc/conv_winograd.h``): 2.25x fewer multiply-adds, in the BLAS matrix products
  ``torch.bmm`` runs. conv4's 64-channel layer on ``[75, 64, 14, 14]``, 1 thread,
  ``benchmarks/bench_grouped_conv2d.py``: forward, input and weight gradient each 1.1-1.9x
  faster than oneDNN's direct kernels; at 7x7, or 4 and 8 channels, they were not, so
  those stay with oneDNN (the constants' comment has the figures).

Elsewhere (other kernel sizes, strides) oneDNN's kernels are the faster ones, and the op
runs ATen's. The input gradient is the forward's convolution of the gradient with the
flipped filters, whose input channels are the forward's output channels, so the same
rule picks its kernel on those.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from pymeta.ops._factory import FusedOp


def reference_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
    groups: int,
) -> Tensor:
    """``F.conv2d``: ``x [B, G*Ci, H, W]``, ``weight [G*Co, Ci, kh, kw]`` -> ``[B, G*Co, H', W']``."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def reference_input_grad(
    grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> Tensor:
    """grad x ``[B, G*Ci, H, W]`` from ``grad: [B, G*Co, H', W']`` (``x``: its shape only)."""
    return _convolution_backward(0, grad, x, weight, stride, padding, dilation, groups)


def reference_weight_grad(
    grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> Tensor:
    """grad weight ``[G*Co, Ci, kh, kw]`` from ``grad: [B, G*Co, H', W']`` (``weight``: its shape only)."""
    return _convolution_backward(1, grad, x, weight, stride, padding, dilation, groups)


def _convolution_backward(which: int, grad: Tensor, x: Tensor, weight: Tensor, *options: Any) -> Tensor:
    """Gradient ``which`` (0: x, 1: weight) of ATen's ``convolution_backward``, the only one it computes."""
    stride, padding, dilation, groups = options
    mask = [i == which for i in range(3)]
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, mask
    )[which]


def _save_all(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    *tensors, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
    ctx.save_for_backward(*(t for t in tensors if t is not None))


def _options(ctx: Any) -> tuple[Any, ...]:
    return ctx.stride, ctx.padding, ctx.dilation, ctx.groups


def _forward_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors[:2]
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    gx = _INPUT_GRAD(grad, x, weight, *_options(ctx)) if need_x else None
    gw = _WEIGHT_GRAD(grad, x, weight, *_options(ctx)) if need_weight else None
    gb = grad.sum((0, 2, 3)) if need_bias else None
    return gx, gw, gb, None, None, None, None


def _input_grad_vjp(ctx: Any, ggx: Tensor) -> tuple[Tensor | None, ...]:
    grad, _, weight = ctx.saved_tensors  # x: its shape only, in the forward
    need_grad, _, need_weight = ctx.needs_input_grad[:3]
    d_grad = _OP(ggx, weight, None, *_options(ctx)) if need_grad else None
    d_weight = _WEIGHT_GRAD(grad, ggx, weight, *_options(ctx)) if need_weight else None
    return d_grad, None, d_weight, None, None, None, None


def _weight_grad_vjp(ctx: Any, ggw: Tensor) -> tuple[Tensor | None, ...]:
    grad, x, _ = ctx.saved_tensors  # weight: its shape only, in the forward
    need_grad, need_x = ctx.needs_input_grad[:2]
    d_grad = _OP(x, ggw, None, *_options(ctx)) if need_grad else None
    d_x = _INPUT_GRAD(grad, x, ggw, *_options(ctx)) if need_x else None
    return d_grad, d_x, None, None, None, None, None


# Which C++ kernels run where they are faster than oneDNN's direct ones (1 thread,
# [75, Ci, 14, 14] by 64 3x3 filters, benchmarks/bench_grouped_conv2d.py): the tap loops
# up to MAX_KERNEL_INPUT_CHANNELS input channels per group (an image model's first layer,
# grey or colour images); between that and WINOGRAD_MIN_CHANNELS oneDNN's (at 4 and 8
# channels Winograd's transforms outweigh its products: 0.7-1.1x); from there Winograd's
# F(2x2, 3x3) for 3x3 filters (16 to 64 channels: 1.0-1.8x), on planes of at least
# WINOGRAD_MIN_OUTPUT outputs a side (at 7 x 7 the tiles' edges cost as much as they save).
MAX_KERNEL_INPUT_CHANNELS = 3
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_OUTPUT = 10


def _not_supported(backend: str, x: Tensor, stride: list[int], dilation: list[int]) -> str | None:
    if x.dtype not in (torch.float32, torch.float64):
        return f"the {backend} kernels take float32 and float64, not {x.dtype}"
    if stride != [1, 1] or dilation != [1, 1]:
        return f"the {backend} kernels compute stride-1, dilation-1 convolutions, not stride {stride}, dilation {dilation}"
    return None


def winograd_filters(kernel_size: Any, padding: Any) -> bool:
    """Whether Winograd's F(2x2, 3x3) computes a convolution with these filters and
    padding (both an int or a pair): 3x3 filters, padding at most 2."""
    return tuple(_pair(kernel_size)) == (3, 3) and max(_pair(padding)) <= 2


def tap_loops_slower(weight: Tensor) -> str | None:
    """Why the C++ tap loops are passed over for ``weight: [G*Co, Ci, kh, kw]``, if they are."""
    if weight.shape[1] > MAX_KERNEL_INPUT_CHANNELS:
        return f"{weight.shape[1]} input channels per group: oneDNN's kernels are faster above {MAX_KERNEL_INPUT_CHANNELS}"
    return None


def _slower(channels: int, x: Tensor, weight: Tensor, padding: list[int]) -> str | None:
    """Why the C++ kernels are passed over for a convolution that reads ``channels`` planes
    per group, of ``x [B, G*Ci, H, W]`` by ``weight [G*Co, Ci, kh, kw]``, if they are."""
    if channels <= MAX_KERNEL_INPUT_CHANNELS:
        return None
    if channels < WINOGRAD_MIN_CHANNELS:
        return (f"{channels} input channels per group: oneDNN's kernels are faster from "
                f"{MAX_KERNEL_INPUT_CHANNELS + 1} to {WINOGRAD_MIN_CHANNELS - 1}")
    if not winograd_filters(weight.shape[2:], padding):
        return (f"{weight.shape[2]}x{weight.shape[3]} filters, padding {padding}: above {MAX_KERNEL_INPUT_CHANNELS} "
                "input channels oneDNN's kernels are faster, but for 3x3 filters with padding <= 2 (Winograd)")
    out = [size + 2 * pad - 2 for size, pad in zip(x.shape[2:], padding, strict=True)]
    if min(out) < WINOGRAD_MIN_OUTPUT:
        return f"{out[0]}x{out[1]} outputs: oneDNN's kernels are as fast or faster below {WINOGRAD_MIN_OUTPUT} a side"
    return None


def slower(x: Tensor, weight: Tensor, padding: list[int]) -> str | None:
    """Why the C++ forward and weight-gradient kernels (tap loops or Winograd) are passed
    over for ``x: [B, G*Ci, H, W]``, ``weight: [G*Co, Ci, kh, kw]``, if they are."""
    return _slower(weight.shape[1], x, weight, padding)


def _input_grad_not_supported(backend: str, x: Tensor, weight: Tensor, *options: Any) -> str | None:
    """The input gradient is the forward convolution of the gradient with the flipped
    filters, padded by the kernel size - 1 - padding."""
    stride, padding, dilation, _ = options
    if any(pad >= size for pad, size in zip(padding, weight.shape[2:], strict=True)):
        return f"the {backend} input gradient takes padding below the kernel size, not {padding}"
    return _not_supported(backend, x, stride, dilation)


_OP = FusedOp("grouped_conv2d", reference_forward, fake=reference_forward, setup_context=_save_all,
              vjp=_forward_vjp, kernels=("cpp",),
              not_supported=lambda backend, x, weight, bias, stride, padding, dilation, groups: _not_supported(
                  backend, x, stride, dilation),
              slower=lambda backend, x, weight, bias, stride, padding, *_: slower(x, weight, padding))
_INPUT_GRAD = FusedOp("grouped_conv2d_input_grad", reference_input_grad, fake=reference_input_grad,
                      setup_context=_save_all, vjp=_input_grad_vjp, kernels=("cpp",),
                      not_supported=lambda backend, grad, *args: _input_grad_not_supported(backend, *args),
                      slower=lambda backend, grad, x, weight, stride, padding, dilation, groups: _slower(
                          weight.shape[0] // groups, x, weight, padding))
_WEIGHT_GRAD = FusedOp("grouped_conv2d_weight_grad", reference_weight_grad, fake=reference_weight_grad,
                       setup_context=_save_all, vjp=_weight_grad_vjp, kernels=("cpp",),
                       not_supported=lambda backend, grad, x, weight, stride, padding, dilation, groups: _not_supported(
                           backend, x, stride, dilation),
                       slower=lambda backend, grad, x, weight, stride, padding, *_: slower(x, weight, padding))


# FLOP formulas (torch.utils.flop_counter): a dispatch mode sees these ops, not the ATen
# convolutions their kernels call, so without them FlopCounterMode counted nothing here.
# Each gradient takes as many multiply-adds as the forward (ATen's convolution_backward
# formula, which ignores groups, counts a grouped weight gradient G times over).
@register_flop_formula(torch.ops.pymeta.grouped_conv2d)
def _forward_flops(x_shape: Any, w_shape: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


@register_flop_formula([torch.ops.pymeta.grouped_conv2d_input_grad, torch.ops.pymeta.grouped_conv2d_weight_grad])
def _gradient_flops(grad_shape: Any, x_shape: Any, w_shape: Any, *_: Any, **__: Any) -> int:
    return conv_flop_count(x_shape, w_shape, grad_shape, transposed=False)


def grouped_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` (numeric padding)
    whose double backward runs no per-group loop (see the module docstring).

    Args:
        x: ``[B, groups * Ci, H, W]``.
        weight: ``[groups * Co, Ci, kh, kw]``.
        bias: ``[groups * Co]`` or None.
        stride, padding, dilation: an int or a pair, as ``F.conv2d``'s.

    Returns:
        ``[B, groups * Co, H', W']``, differentiable to any order.
    """
    stride, padding, dilation = (list(_pair(v)) for v in (stride, padding, dilation))
    return _OP(x, weight, bias, stride, padding, dilation, groups)
