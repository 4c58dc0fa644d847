"""The outer (meta) loss of one batch of episodes, whichever learner computes it."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def episode_loss(
    learner: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """Mean query loss over all tasks and queries: ``loss_fn(pred [T*Q, ...], query_y [T*Q, ...])``.

    ``pred`` is ``learner.episode(support_x, support_y, query_x)``, flattened over tasks
    and queries. A learner with a ``task_chunk`` (the MAML family) computes the same
    mean chunk by chunk with its ``meta_loss`` instead, to bound memory.
    """
    if getattr(learner, "task_chunk", None) is not None:
        return learner.meta_loss(support_x, support_y, query_x, query_y, loss_fn=loss_fn)
    pred = learner.episode(support_x, support_y, query_x)
    return loss_fn(pred.flatten(0, 1), query_y.flatten(0, 1))
