"""Shared-weight embedding of every task of an episode at once (ANIL, ProtoNet, FineTune)."""

from __future__ import annotations

from torch import Tensor, nn

from pymeta.core.batched import TaskBatched
from pymeta.core.norms import has_batch_norm


def embed(module: nn.Module, x: Tensor) -> Tensor:
    """Run ``module`` with its own weights on all tasks: ``x: [T, B, ...]`` -> ``[T, B, ...]``.

    Without BatchNorm the tasks are independent given shared weights, so the examples
    are flattened to one batch ``[T * B, ...]`` and the module runs once, at full speed.
    With BatchNorm, the episode policy of :mod:`pymeta.core.norms` applies: each task is
    normalised with its own batch statistics (here over all B examples the caller
    passes, e.g. support and query together) and running statistics stay untouched.
    ``vmap`` over tasks does that; with unbatched weights it still runs one plain kernel
    per layer (the task dim folds into the batch dim), so there is no loop to pick.
    """
    if has_batch_norm(module):
        return TaskBatched(module).forward({}, x, "vmap")
    return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])
