"""The batched inner loop shared by every gradient-based meta-learner."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.core.batched import FastWeights, LossFn, TaskBatched
from pymeta.ops import inner_sgd

InnerLR = float | Tensor | Sequence[Tensor]


def trainable(weights: FastWeights) -> FastWeights:
    """Fast weights the inner loop can differentiate even when autograd is off outside.

    Under ``torch.no_grad()`` (evaluation) the expanded meta-parameters carry no graph;
    detached copies that require grad let the inner loop still take its gradients.
    """
    if torch.is_grad_enabled():
        return weights
    return {n: w.detach().requires_grad_() for n, w in weights.items()}


def inner_loop(
    batched: TaskBatched,
    weights: FastWeights,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    lr: InnerLR,
    steps: int,
    first_order: bool,
    strategy: str,
    check_finite: bool = False,
) -> FastWeights:
    """Take ``steps`` SGD steps on every task's loss at once.

    Args:
        weights: ``{name: [T, *shape]}`` fast weights to adapt.
        x: support inputs ``[T, S, ...]``; ``y``: support targets ``[T, S, ...]``, checked
            against the first predictions (:func:`pymeta._validate.targets`).
        lr: float, per-task ``[T]``, or one per-element tensor per adapted weight.
        first_order: drop the second-order terms (inner gradients are constants).
        check_finite: raise ``FloatingPointError`` naming the task and step when a task's
            loss or gradient is NaN or infinite (:func:`check_finite_step`). Off by
            default: the check reads the values, one device sync per inner step.

    The loss summed over tasks has, w.r.t. task t's fast weights, exactly task t's own
    gradient (tasks share no fast weight), so one ``autograd.grad`` call serves all T.
    With ``create_graph`` the update stays differentiable: the meta-gradient is the
    full second-order one.
    """
    weights = trainable(weights)
    create_graph = not first_order and torch.is_grad_enabled()
    names = list(weights)
    with torch.enable_grad():
        for step in range(steps):
            pred = batched.forward(weights, x, strategy)
            if step == 0:  # shapes do not change between steps
                _validate.targets("support_y", pred, y, loss_fn)
            losses = batched.losses(loss_fn, pred, y, strategy)
            values = [weights[n] for n in names]
            grads = torch.autograd.grad(losses.sum(), values, create_graph=create_graph, allow_unused=True)
            # A weight the loss does not use (e.g. a head row never selected) has zero grad.
            grads = [torch.zeros_like(w) if g is None else g for w, g in zip(values, grads, strict=True)]
            if check_finite:
                check_finite_step(step, losses, dict(zip(names, grads, strict=True)))
            weights = dict(zip(names, inner_sgd(values, grads, lr), strict=True))
    return weights


def check_finite_step(step: int, losses: Tensor, grads: FastWeights) -> None:
    """Raise ``FloatingPointError`` if any task's loss or gradient is NaN or infinite.

    Args:
        step: the inner step (0-based), for the message.
        losses: per-task losses ``[T]``.
        grads: ``{name: [T, *shape]}`` per-task gradients of the fast weights.

    The message names the first bad task (its index in the task dim, 0-based) and, for
    a finite loss with a non-finite gradient, the weight. All tasks are checked with
    one device sync; the slow path that builds the message runs only on failure.
    """
    bad_loss = ~torch.isfinite(losses.detach())  # [T]
    # [P, T]: whether weight p of task t has a non-finite gradient entry.
    bad_grad = torch.stack([~torch.isfinite(g.detach()).reshape(g.shape[0], -1).all(1) for g in grads.values()])
    if not (bad_loss.any() | bad_grad.any()):
        return
    task = int((bad_loss | bad_grad.any(0)).nonzero()[0])
    if bad_loss[task]:
        raise FloatingPointError(
            f"inner loop: task {task} step {step} has a non-finite loss ({losses[task].item()})"
        )
    name = list(grads)[int(bad_grad[:, task].nonzero()[0])]
    raise FloatingPointError(
        f"inner loop: task {task} step {step} has a non-finite gradient of {name!r} "
        f"(the loss is finite, {losses[task].item():.6g})"
    )
