"""A conv block's tail in one pass: BatchNorm, ReLU and 2x2 max-pooling.

Every block of the conv4 backbone of few-shot learning (Vinyals et al. 2016; Finn et
al. 2017; Snell et al. 2017) is ``conv -> BatchNorm2d -> ReLU -> MaxPool2d(2)``. On the
CPU the three ATen kernels after the convolution are memory-bound passes over the
full-resolution activation (``[75, 64, 28, 28]`` in a 5-way 1-shot MAML step with 15
queries per class): BatchNorm's statistics and normalisation write a normalised copy,
pooling reads it and writes values and int64 indices, and the backward zero-fills a
full-resolution gradient before scattering into it and running BatchNorm's backward
over it. In a conv4 second-order MAML step those passes took more time than the
convolutions of the first block. This op computes::

    batch_norm_relu_pool(x [B, C, H, W], weight [C], bias [C], running_mean, running_var, eps)
        = relu(max_pool2d(batch_norm(x, ...), 2)) -> [B, C, H // 2, W // 2]

BatchNorm with the batch's statistics (train mode; ``running_mean`` / ``running_var``
None) or the given running statistics (eval mode; not updated either way: an episode
never writes them, :mod:`pymeta.core.norms`). ReLU commutes with max-pooling (both are
monotonic), so the order of the two does not matter.

The C++ kernel (``csrc/batch_norm_relu_pool.cpp``) works one channel at a time, so
each pass over a channel's values finds them in the cache, and it never materialises
the normalised activation, the pooling indices or a zero-filled gradient: forward and
backward each read the input about once from memory. Its backward saves only the input
and the output (which the next convolution keeps anyway). The op is the custom op
``pymeta::batch_norm_relu_pool``, whose vjp is the op
``pymeta::batch_norm_relu_pool_backward``, whose vjp in turn is
``pymeta::batch_norm_relu_pool_backward_backward`` (what second-order MAML runs in its
outer backward), each with a C++ kernel and each made by
:class:`pymeta.ops._factory.FusedOp`. The references below are the implementation
elsewhere (GPU: cuDNN's BatchNorm and ATen's pooling) and, differentiable, the third
derivative's.

Where results differ from the three ATen ops: values are the same up to rounding (the
kernel centres x on the mean before scaling, as ATen does, in its own order of sums);
the window's maximum is chosen on ``x`` (BatchNorm is monotonic per channel), so when
two inputs of a window round to the same normalised value the gradient may go to the
other one of the two than ATen's pooling picks (both are valid subgradients; distinct
normalised values never differ).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pymeta import _validate
from pymeta.ops._factory import FusedOp
from pymeta.ops.max_pool2d import window_choices

_DIMS = (0, 2, 3)  # the statistics' dims: examples and positions


def _channel(p: Tensor, dtype: torch.dtype) -> Tensor:
    """``[C]`` -> ``[1, C, 1, 1]`` in ``dtype``."""
    return p.to(dtype).view(1, -1, 1, 1)


def reference_forward(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None, running_var: Tensor | None, eps: float
) -> Tensor:
    """``relu(max_pool2d(batch_norm(x), 2))`` with ATen's kernels: ``[B, C, H // 2, W // 2]``."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, running_mean is None, 0.0, eps)
    return torch.relu(F.max_pool2d(y, 2))


class _Routed(NamedTuple):
    """What both references need: x normalised, and grad routed to the window choices."""

    xhat: Tensor  # [B, C, H, W], in the accumulation dtype
    invstd: Tensor  # [1, C, 1, 1]
    w: Tensor  # weight, [1, C, 1, 1]
    mask: Tensor  # out > 0, [B, C, H // 2, W // 2]
    where: Tensor  # each window's choice (flat index in its plane), [B, C, H // 2, W // 2]
    gy: Tensor  # grad where mask, routed to the choices: [B, C, H, W]


def _routed(
    grad: Tensor, x: Tensor, out: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None,
    running_var: Tensor | None, eps: float,
) -> _Routed:
    """Differentiable in ``grad``, ``x`` and ``weight``; the ReLU mask (``out > 0``) and the
    window choices are piecewise constant: they need no derivative."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    if running_mean is None:
        # Two passes, not torch.var_mean: its reduction over NCHW's (0, 2, 3) was 15x
        # slower ([5, 64, 28, 28] float32, 1 thread: 1.4 ms against 0.09 ms).
        mean = xa.mean(_DIMS, keepdim=True)
        var = (xa - mean).square().mean(_DIMS, keepdim=True)
    else:
        mean, var = _channel(running_mean, acc), _channel(running_var, acc)
    invstd = torch.rsqrt(var + eps)
    xhat = (xa - mean) * invstd
    w = _channel(weight, acc)
    y = xhat * w + _channel(bias, acc)
    # The window choices by pymeta's pooling kernel (ATen's NCHW pooling with indices was
    # as slow as the rest of this backward together), gz routed to them by ATen's NCHW
    # pooling backward: linear in gz, its own derivative a gather by the same indices.
    _, where = window_choices(y.detach().contiguous(), [2, 2], [2, 2])
    mask = out > 0
    gz = torch.where(mask, grad.to(acc), 0)
    gy = torch.ops.aten.max_pool2d_with_indices_backward(gz, y.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False, where)
    return _Routed(xhat, invstd, w, mask, where, gy)


def reference_backward(
    grad: Tensor,
    x: Tensor,
    out: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(x [B, C, H, W], weight [C], bias [C])`` from ``grad: [B, C, H // 2, W // 2]``.

    The backward op wherever no kernel runs (the reference backend, other devices); its
    derivative is :func:`reference_double_backward`, not autograd through this code.
    """
    r = _routed(grad, x, out, weight, bias, running_mean, running_var, eps)
    gy, xhat = r.gy, r.xhat
    g_bias = gy.sum(_DIMS)
    g_weight = (gy * xhat).sum(_DIMS)
    gxhat = gy * r.w
    if running_mean is None:  # the batch statistics depend on every input of the channel
        gxhat = gxhat - gxhat.mean(_DIMS, keepdim=True) - xhat * (gxhat * xhat).mean(_DIMS, keepdim=True)
    return (gxhat * r.invstd).to(x.dtype), g_weight.to(weight.dtype), g_bias.to(bias.dtype)


def reference_double_backward(
    gg_x: Tensor,
    gg_weight: Tensor,
    gg_bias: Tensor,
    grad: Tensor,
    x: Tensor,
    out: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's vjp: gradients ``(grad, x [B, C, H, W], weight [C])`` of
    ``<gg_x, grad x> + <gg_weight, grad weight> + <gg_bias, grad bias>``.

    What a second-order meta-gradient runs through every block. It is BatchNorm's double
    backward (as ATen's ``batchnorm_double_backward``, FunctionsManual.cpp) around the
    routing of ``grad`` to the window choices: with ``gy`` the routed gradient, ``a =
    gg_x``, per-channel sums ``S`` over the ``M`` positions, ``s = invstd`` and ``t = 1 / M``
    in train mode (0 in eval mode, where the statistics do not depend on ``x``)::

        d gy     = w s (a - t Sa - t xhat Sax) + gg_weight xhat + gg_bias, gathered at the choices
        d weight = s (Sga - t (Sa Sg + Sax Sgx))
        d x      = w s^2 t (xhat (t Sa Sg - Sga + 3 t Sgx Sax) + t (Sax Sg + Sgx Sa) - Sax gy - Sgx a)
                   + gg_weight s (gy - t Sg - t xhat Sgx)

    (``Sga = sum gy a``, ``Sgx = sum gy xhat``, ...). ``grad`` 's ReLU mask and window
    choices are piecewise constant and ``bias`` only moves the choices: ``out`` and
    ``bias`` get no gradient. Built from differentiable torch ops (third order).
    """
    r = _routed(grad, x, out, weight, bias, running_mean, running_var, eps)
    gy, xhat, s, w = r.gy, r.xhat, r.invstd, r.w
    gw, gb = _channel(gg_weight, gy.dtype), _channel(gg_bias, gy.dtype)
    a = gg_x.to(gy.dtype)
    t = 1.0 / (x.shape[0] * x.shape[2] * x.shape[3]) if running_mean is None else 0.0

    def total(v: Tensor) -> Tensor:
        return v.sum(_DIMS, keepdim=True)

    s_g, s_gx, s_a, s_ax, s_ga = total(gy), total(gy * xhat), total(a), total(a * xhat), total(gy * a)
    d_gy = w * s * (a - t * s_a - t * xhat * s_ax) + gw * xhat + gb
    d_grad = torch.where(r.mask, d_gy.flatten(2).gather(2, r.where.flatten(2)).view_as(grad), 0)
    d_weight = s * (s_ga - t * (s_a * s_g + s_ax * s_gx))
    d_x = (w * s * s * t * (xhat * (t * s_a * s_g - s_ga + 3 * t * s_gx * s_ax) + t * (s_ax * s_g + s_gx * s_a)
                            - s_ax * gy - s_gx * a)
           + gw * s * (gy - t * s_g - t * xhat * s_gx))
    return d_grad.to(grad.dtype), d_x.to(x.dtype), d_weight.view(-1).to(weight.dtype)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    *tensors, ctx.eps = inputs
    ctx.save_for_backward(*tensors, output)


def _vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, bias, running_mean, running_var, out = ctx.saved_tensors
    grads = _BACKWARD(grad, x, out, weight, bias, running_mean, running_var, ctx.eps)
    return (*grads, None, None, None)  # running statistics are buffers: no gradient


def _backward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    *tensors, ctx.eps = inputs
    ctx.save_for_backward(*tensors)


def _backward_vjp(ctx: Any, gg_x: Tensor, gg_weight: Tensor, gg_bias: Tensor) -> tuple[Tensor | None, ...]:
    d_grad, d_x, d_weight = _BACKWARD.backward(gg_x, gg_weight, gg_bias, *ctx.saved_tensors, ctx.eps)
    return d_grad, d_x, None, d_weight, None, None, None, None  # out, bias: piecewise constant (see above)


def _fake(x: Tensor, *_: Any) -> Tensor:
    return x.new_empty(*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2)


def _backward_fake(grad: Tensor, x: Tensor, out: Tensor, weight: Tensor, bias: Tensor,
                   *_: Any) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _double_backward_fake(gg_x: Tensor, gg_weight: Tensor, gg_bias: Tensor, grad: Tensor, x: Tensor,
                          *_: Any) -> tuple[Tensor, Tensor, Tensor]:
    return grad.new_empty(grad.shape), x.new_empty(x.shape), gg_weight.new_empty(gg_weight.shape)


def _not_supported(backend: str, first: Tensor, *_: Any) -> str | None:
    """For each of the three ops: their tensors all have x's dtype."""
    if first.dtype not in (torch.float32, torch.float64):
        return f"the C++ kernel takes float32 and float64, got {first.dtype}"
    return None


# Three ops, each the vjp of the one before: the backward is an op with a formula of its
# own, not a graph of torch ops, so a second-order step (eager or compiled) runs two fused
# kernels per block where the backward's graph had about twenty ATen (or Inductor) kernels.
_BACKWARD = FusedOp(
    "batch_norm_relu_pool_backward", reference_backward, fake=_backward_fake,
    backward=reference_double_backward, backward_fake=_double_backward_fake,
    setup_context=_backward_setup_context, vjp=_backward_vjp,
    not_supported=_not_supported, backward_not_supported=_not_supported,
    kernels=("cpp",),
)
_OP = FusedOp(
    "batch_norm_relu_pool", reference_forward, fake=_fake, setup_context=_setup_context, vjp=_vjp,
    not_supported=_not_supported, kernels=("cpp",),
)


def checked_norm_parameters(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
    eps: float, C: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, float]:
    """``(weight, bias, running_mean, running_var, eps)`` of ``C`` normalised channels,
    checked against ``x``'s dtype and device; a None weight or bias is 1 or 0."""
    eps = _validate.norm_statistics(running_mean, running_var, eps)
    weight, bias = channel_param("weight", weight, x, 1.0, C), channel_param("bias", bias, x, 0.0, C)
    if running_mean is not None:
        running_mean = channel_param("running_mean", running_mean, x, 0.0, C)
        running_var = channel_param("running_var", running_var, x, 1.0, C)
    return weight, bias, running_mean, running_var, eps


def channel_param(name: str, value: Tensor | None, x: Tensor, default: float, C: int) -> Tensor:
    """A per-channel tensor ``[C]`` (None: ``default``), checked against ``x``'s dtype and device."""
    if value is None:
        return x.new_full((C,), default)
    _validate.tensor(name, value)
    _validate.same_dtype(("x", name), x, value)
    _validate.same_device({"x": x, name: value})
    if value.shape != (C,):
        raise ValueError(f"{name} must be [C] = [{C}] (the normalised channels), got shape {tuple(value.shape)}")
    return value


def batch_norm_relu_pool(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``relu(max_pool2d(batch_norm(x), 2))`` in one pass (see the module docstring).

    Args:
        x: ``[B, C, H, W]``, ``H, W >= 2`` (an odd last row or column is normalised and
            counted in the statistics, and pooled away, as by the three ops).
        weight, bias: BatchNorm's affine parameters ``[C]``; None: 1 and 0 (``affine=False``).
        running_mean, running_var: ``[C]``: normalise with them (eval mode; buffers, not
            differentiated, not updated); None (both): with the statistics of ``x`` over
            its examples and positions (train mode; biased variance, as BatchNorm).
        eps: added to the variance, as BatchNorm's ``eps``.

    Returns:
        ``[B, C, H // 2, W // 2]`` in ``x``'s dtype, differentiable w.r.t. ``x``,
        ``weight`` and ``bias`` to any order.
    """
    _validate.floating("x", x)
    _validate.ndim("x", x, 4, "[B, C, H, W]")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x [B, C, H, W] needs H, W >= 2 for 2x2 pooling, got shape {tuple(x.shape)}")
    weight, bias, running_mean, running_var, eps = checked_norm_parameters(
        x, weight, bias, running_mean, running_var, eps, x.shape[1]
    )
    return _OP(x, weight, bias, running_mean, running_var, eps)
