"""ProtoNet prototypes: per-task class means of the support embeddings.

``prototypes(support: [T, S, D], labels: [T, S], n_way) -> [T, N, D]`` with
``N = n_way``: row ``[t, c]`` is the mean of the support rows of task ``t`` labelled
``c``. Every label must lie in ``[0, n_way)`` and every class must have at least one
example in every task; either violation raises a ``ValueError`` naming the task and
class (a mean over no examples would be NaN).

The op is the custom op ``pymeta::prototypes`` (default implementation: the pure
PyTorch reference) with the fused backward op ``pymeta::prototypes_backward``
(``grad_support[t, s] = grad[t, labels[t, s]] / count[t, labels[t, s]]``); both
dispatch per call through :func:`pymeta.ops._backends.select`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.ops import _backends
from pymeta.ops._vmap import register_task_fold


def _one_hot(labels: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    # A comparison rather than F.one_hot: no data-dependent checks, so it also runs under
    # vmap in the double-backward path (labels were checked by the forward).
    classes = torch.arange(n_way, device=labels.device)
    return (labels.unsqueeze(-1) == classes).to(dtype)


def reference_forward(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Pure PyTorch class means ``[T, n_way, D]``; checks the label values first."""
    counts = _validate.class_counts(labels, n_way)
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


@torch.library.custom_op("pymeta::prototypes", mutates_args=())
def _forward_op(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    return reference_forward(support, labels, n_way)


@_forward_op.register_fake
def _(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    return support.new_empty(support.shape[0], n_way, support.shape[2])


@_forward_op.register_kernel(("cpu", "cuda"))
def _(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    backend = _backends.select(support.device)
    if backend in ("cuda", "triton"):  # the cpp kernel and the reference check the labels themselves
        _validate.class_counts(labels, n_way)
    args = (support, labels, n_way)
    return _backends.run(backend, "prototypes", args, lambda: reference_forward(*args))


@torch.library.custom_op("pymeta::prototypes_backward", mutates_args=())
def _backward_op(grad: Tensor, labels: Tensor, n_way: int) -> Tensor:
    return reference_backward(grad, labels, n_way)


@_backward_op.register_fake
def _(grad: Tensor, labels: Tensor, n_way: int) -> Tensor:
    return grad.new_empty(labels.shape[0], labels.shape[1], grad.shape[2])


@_backward_op.register_kernel(("cpu", "cuda"))
def _(grad: Tensor, labels: Tensor, n_way: int) -> Tensor:
    # The forward checked the labels; the GPU kernels still mask out-of-range ones.
    args = (grad, labels, n_way)
    return _backends.run(_backends.select(grad.device), "prototypes_backward", args, lambda: reference_backward(*args))


register_task_fold(_forward_op)
register_task_fold(_backward_op)


class _Prototypes(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
        return _forward_op(support, labels, n_way)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, int], output: Tensor) -> None:
        _, labels, n_way = inputs
        ctx.save_for_backward(labels)
        ctx.n_way = n_way

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (labels,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the backward itself must be differentiable
            return reference_backward(grad, labels, ctx.n_way), None, None
        return _backward_op(grad, labels, ctx.n_way), None, None


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
    _validate.ndim("support", support, 3, "[T, S, D]")
    _validate.ndim("labels", labels, 2, "[T, S]")
    _validate.same_dim(("support", "labels"), support, labels, 0, "the number of tasks T")
    _validate.same_dim(("support", "labels"), support, labels, 1, "the number of support examples S")
    _validate.same_device({"support": support, "labels": labels})
    _validate.positive_int("n_way", n_way)
    return _Prototypes.apply(support, labels, n_way)
