"""Relation Network pairs: the first relation block's BatchNorm and ReLU over every
(query, class) pair of every task, from two partial convolutions, without the pairs.

A Relation Network (Sung et al. 2018) scores a query against a class by a CNN over the
two feature maps concatenated on channels, ``[p; q]: [2C, H, W]``, for every pair: the
``[Q * N, 2C, H, W]`` tensor easyfsl and the paper's code build per task. Their first
layer is a convolution, which is linear in its input channels:
``conv(W, [p; q]) + bias = conv(W[:, :C], p) + bias + conv(W[:, C:], q)``. So the caller
convolves the N class maps and the Q query maps once each (N + Q convolutions per task
instead of Q * N) and this op forms the pair activations as a broadcast sum at the
convolution's output width C' and applies the block's BatchNorm and ReLU::

    relation_pairs(classes [T, N, C', H, W], queries [T, Q, C', H, W], weight, bias,
                   running_mean, running_var, eps) -> [T, Q, N, C', H, W]
    out[t, q, n] = relu((classes[t, n] + queries[t, q] - mean[t]) / sqrt(var[t] + eps)
                        * weight[t] + bias[t])

with ``mean[t], var[t]`` (per channel) the statistics of task ``t``'s Q * N pairs and H * W
positions (BatchNorm in train mode: one task's pairs only, never a mix of tasks), or the
running statistics when they are given (eval mode).

What it fuses and why: the pair sum, the normalisation and the ReLU, i.e. everything
between the convolution and whatever the block does next (a ``MaxPool2d(2)`` in the
paper, an ``AdaptiveMaxPool2d((5, 5))`` in easyfsl, nothing in other variants), which
runs unchanged on the result. Nothing of size ``Q * N * 2C * H * W`` exists and the op
saves only its small inputs for backward (``(N + Q) * C' * H * W`` per task): the batch
statistics are computed in closed form from the two sides
(``var = mean_hw[var_n(classes) + var_q(queries) + (mean_n classes + mean_q queries - mean)^2]``),
and the backward recomputes the pre-activations from the inputs, reading each pair's
incoming gradient once. Its only pair-sized tensor is its output, which the next layer
keeps anyway.

The op is the custom op ``pymeta::relation_pairs`` with the fused backward op
``pymeta::relation_pairs_backward``, both made by :class:`pymeta.ops._factory.FusedOp`
from the references below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.ops._factory import FusedOp

# The statistics' dims of the pair tensor [T, Q, N, C, H, W]: pairs and positions.
_PAIR_DIMS = (1, 2, 4, 5)


def _per_channel(p: Tensor, acc: torch.dtype) -> Tensor:
    """``[T, C]`` -> ``[T, 1, 1, C, 1, 1]``, broadcasting against the pairs."""
    return p.to(acc)[:, None, None, :, None, None]


def _normalised(
    classes: Tensor, queries: Tensor, running_mean: Tensor | None, running_var: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(xhat [T, Q, N, C, H, W], invstd [T, 1, 1, C, 1, 1])`` of the pairs, in the accumulation dtype."""
    acc = torch.promote_types(classes.dtype, torch.float32)
    x = classes.to(acc).unsqueeze(1) + queries.to(acc).unsqueeze(2)
    if running_mean is None:
        var, mean = torch.var_mean(x, dim=_PAIR_DIMS, correction=0, keepdim=True)
    else:
        mean, var = _per_channel(running_mean, acc), _per_channel(running_var, acc)
    invstd = torch.rsqrt(var + eps)
    return (x - mean) * invstd, invstd


def reference_forward(
    classes: Tensor,
    queries: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
) -> Tensor:
    """Pure PyTorch pair activations ``[T, Q, N, C, H, W]`` (materialises the pairs)."""
    xhat, _ = _normalised(classes, queries, running_mean, running_var, eps)
    out = xhat * _per_channel(weight, xhat.dtype) + _per_channel(bias, xhat.dtype)
    return torch.relu(out).to(classes.dtype)


def reference_backward(
    grad: Tensor,
    classes: Tensor,
    queries: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(classes [T, N, C, H, W], queries [T, Q, C, H, W], weight [T, C], bias [T, C])``.

    ``grad: [T, Q, N, C, H, W]``. Built from differentiable torch ops, so it also serves
    as the backward of a ``create_graph=True`` pass (second derivatives differentiate
    through it); the ReLU's mask is piecewise constant, so it needs no derivative.
    """
    xhat, invstd = _normalised(classes, queries, running_mean, running_var, eps)
    acc = xhat.dtype
    w = _per_channel(weight, acc)
    gz = torch.where(xhat * w + _per_channel(bias, acc) > 0, grad.to(acc), 0)
    g_bias = gz.sum(_PAIR_DIMS)
    g_weight = (gz * xhat).sum(_PAIR_DIMS)
    gxhat = gz * w
    if running_mean is None:  # the batch statistics depend on every pair of the task
        gxhat = gxhat - gxhat.mean(_PAIR_DIMS, keepdim=True) - xhat * (gxhat * xhat).mean(_PAIR_DIMS, keepdim=True)
    gx = gxhat * invstd
    return (gx.sum(1).to(classes.dtype), gx.sum(2).to(queries.dtype),
            g_weight.to(weight.dtype), g_bias.to(bias.dtype))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    *tensors, ctx.eps = inputs
    ctx.save_for_backward(*tensors)  # the inputs only: the pairs are recomputed


def _vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    grads = _OP.backward(grad, *ctx.saved_tensors, ctx.eps)
    return (*grads, None, None, None)  # running statistics are buffers: no gradient


def _fake(classes: Tensor, queries: Tensor, *_: Any) -> Tensor:
    T, N = classes.shape[:2]
    return classes.new_empty(T, queries.shape[1], N, *classes.shape[2:])


def _backward_fake(grad: Tensor, classes: Tensor, queries: Tensor, weight: Tensor, bias: Tensor,
                   *_: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(x.new_empty(x.shape) for x in (classes, queries, weight, bias))


_OP = FusedOp(
    "relation_pairs", reference_forward, fake=_fake,
    backward=reference_backward, backward_fake=_backward_fake,
    setup_context=_setup_context, vjp=_vjp,
    fold_tasks=True,
)


def _task_param(name: str, value: Tensor | None, like: Tensor, default: float) -> Tensor:
    """A per-channel parameter as ``[T, C]`` (``[C]`` is shared by the tasks; None: ``default``)."""
    T, C = like.shape[0], like.shape[2]
    if value is None:
        return like.new_full((T, C), default)
    _validate.tensor(name, value)
    _validate.same_dtype(("classes", name), like, value)
    _validate.same_device({"classes": like, name: value})
    if value.shape == (C,):
        return value.unsqueeze(0).expand(T, C)
    if value.shape != (T, C):
        raise ValueError(f"{name} must be [C] = [{C}] or [T, C] = [{T}, {C}], got shape {tuple(value.shape)}")
    return value


def relation_pairs(
    classes: Tensor,
    queries: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``relu(batch_norm(classes[:, None] + queries[:, :, None]))`` for every pair of every task.

    The first block of a Relation Network's relation module after its convolution, with
    BatchNorm statistics per task, without materialising the ``[Q * N, 2C, H, W]`` pairs
    (see the module docstring for how a convolution of the pairs splits into ``classes``
    and ``queries``).

    Args:
        classes: ``[T, N, C, H, W]`` the class side of the pair pre-activations.
        queries: ``[T, Q, C, H, W]`` the query side (same dtype and trailing dims).
        weight, bias: BatchNorm's affine parameters, ``[C]`` (shared by the tasks) or
            ``[T, C]``; None: 1 and 0 (``affine=False``).
        running_mean, running_var: ``[C]`` or ``[T, C]``: normalise with them (BatchNorm
            in eval mode; not differentiated, they are buffers); None (both): with each
            task's statistics over its ``Q * N`` pairs and ``H * W`` positions (train mode).
        eps: added to the variance, as BatchNorm's ``eps``.

    Returns:
        ``[T, Q, N, C, H, W]`` in ``classes``' dtype, differentiable w.r.t. ``classes``,
        ``queries``, ``weight`` and ``bias`` to any order.
    """
    _validate.floating("classes", classes)
    _validate.floating("queries", queries)
    _validate.ndim("classes", classes, 5, "[T, N, C, H, W]")
    _validate.ndim("queries", queries, 5, "[T, Q, C, H, W]")
    _validate.same_dtype(("classes", "queries"), classes, queries)
    _validate.same_device({"classes": classes, "queries": queries})
    _validate.same_dim(("classes", "queries"), classes, queries, 0, "the number of tasks T")
    if classes.shape[2:] != queries.shape[2:]:
        raise ValueError(
            "classes [T, N, C, H, W] and queries [T, Q, C, H, W] must agree on C, H and W: "
            f"got classes {tuple(classes.shape)}, queries {tuple(queries.shape)}"
        )
    eps = _validate.norm_statistics(running_mean, running_var, eps)
    weight, bias = _task_param("weight", weight, classes, 1.0), _task_param("bias", bias, classes, 0.0)
    if running_mean is not None:
        running_mean = _task_param("running_mean", running_mean, classes, 0.0)
        running_var = _task_param("running_var", running_var, classes, 1.0)
    return _OP(classes, queries, weight, bias, running_mean, running_var, eps)
