"""ProtoNet prototypes: per-task class means of the support embeddings.

``prototypes(support: [T, S, D], labels: [T, S], n_way) -> [T, N, D]`` with
``N = n_way``: row ``[t, c]`` is the mean of the support rows of task ``t`` labelled
``c``. Every label must lie in ``[0, n_way)`` and every class must have at least one
example in every task; either violation raises a ``ValueError`` naming the task and
class (a mean over no examples would be NaN).

The op is the custom op ``pymeta::prototypes`` with the fused backward op
``pymeta::prototypes_backward`` (``grad_support[t, s] = grad[t, labels[t, s]] /
count[t, labels[t, s]]``), both made by :class:`pymeta.ops._factory.FusedOp` from the
references below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pymeta import _validate, _value_checks
from pymeta.ops._factory import FusedOp


def _one_hot(labels: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    # A comparison rather than F.one_hot: no data-dependent checks, so it also runs under
    # vmap in the double-backward path (labels were checked by the forward).
    classes = torch.arange(n_way, device=labels.device)
    return (labels.unsqueeze(-1) == classes).to(dtype)


def reference_forward(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Pure PyTorch class means ``[T, n_way, D]``; checks the label values first."""
    counts = _value_checks.class_counts(labels, n_way)
    acc = torch.promote_types(support.dtype, torch.float32)
    sums = torch.bmm(_one_hot(labels, n_way, acc).mT, support.to(acc))
    return (sums / counts.unsqueeze(-1)).to(support.dtype)


def reference_backward(grad: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """``grad_support: [T, S, D]`` from ``grad: [T, n_way, D]``; differentiable in ``grad``.

    Also the backward of a ``create_graph=True`` pass, so it uses no data-dependent checks.
    """
    acc = torch.promote_types(grad.dtype, torch.float32)
    one_hot = _one_hot(labels, n_way, acc)
    per_class = grad.to(acc) / one_hot.sum(1).unsqueeze(-1)
    return torch.bmm(one_hot, per_class).to(grad.dtype)


def _check_label_values(backend: str, support: Tensor, labels: Tensor, n_way: int) -> None:
    # The cpp kernel and the reference check label values themselves; the GPU kernels
    # cannot raise a ValueError naming the task and class.
    if backend != "cpp":
        _value_checks.class_counts(labels, n_way)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, int], output: Tensor) -> None:
    _, labels, n_way = inputs
    ctx.save_for_backward(labels)
    ctx.n_way = n_way


def _vjp(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
    (labels,) = ctx.saved_tensors
    # The forward checked the labels; the GPU backward kernels still mask out-of-range ones.
    return _OP.backward(grad, labels, ctx.n_way), None, None


_OP = FusedOp(
    "prototypes", reference_forward,
    fake=lambda support, labels, n_way: support.new_empty(support.shape[0], n_way, support.shape[2]),
    backward=reference_backward,
    backward_fake=lambda grad, labels, n_way: grad.new_empty(labels.shape[0], labels.shape[1], grad.shape[2]),
    setup_context=_setup_context, vjp=_vjp,
    before_kernel=_check_label_values,
    fold_tasks=True,
)


def prototypes(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class prototypes ``[T, n_way, D]``: the mean support embedding of each class per task.

    Args:
        support: ``[T, S, D]`` floating-point support embeddings.
        labels: ``[T, S]`` integer class labels in ``[0, n_way)``; every class must occur in
            every task.
        n_way: number of classes N.

    Returns:
        ``[T, n_way, D]`` in ``support``'s dtype, differentiable w.r.t. ``support`` to any
        order.
    """
    _validate.floating("support", support)
    _validate.integer("labels", labels)
    _validate.layouts({"support": (support, "[T, S, D]"), "labels": (labels, "[T, S]")})
    _validate.same_device({"support": support, "labels": labels})
    _validate.positive_int("n_way", n_way)
    return _OP(support, labels, n_way)
