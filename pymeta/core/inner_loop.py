"""The batched inner loop shared by every gradient-based meta-learner."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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
) -> FastWeights:
    """Take ``steps`` SGD steps on every task's loss at once.

    Args:
        weights: ``{name: [T, *shape]}`` fast weights to adapt.
        x: support inputs ``[T, S, ...]``; ``y``: support targets ``[T, S, ...]``.
        lr: float, per-task ``[T]``, or one per-element tensor per adapted weight.
        first_order: drop the second-order terms (inner gradients are constants).

    The loss summed over tasks has, w.r.t. task t's fast weights, exactly task t's own
    gradient (tasks share no fast weight), so one ``autograd.grad`` call serves all T.
    With ``create_graph`` the update stays differentiable: the meta-gradient is the
    full second-order one.
    """
    weights = trainable(weights)
    create_graph = not first_order and torch.is_grad_enabled()
    names = list(weights)
    with torch.enable_grad():
        for _ in range(steps):
            pred = batched.forward(weights, x, strategy)
            loss = batched.losses(loss_fn, pred, y, strategy).sum()
            values = [weights[n] for n in names]
            grads = torch.autograd.grad(loss, values, create_graph=create_graph, allow_unused=True)
            # A weight the loss does not use (e.g. a head row never selected) has zero grad.
            grads = [torch.zeros_like(w) if g is None else g for w, g in zip(values, grads, strict=True)]
            weights = dict(zip(names, inner_sgd(values, grads, lr), strict=True))
    return weights
