"""Shared-weight embedding of every task of an episode at once (ANIL, ProtoNet, FineTune).

The embedding network runs with its own weights (no per-task fast weights), so without
BatchNorm the tasks are independent and the examples of all tasks are flattened into one
batch ``[T * B, ...]``: one call, at full speed, on any device, nothing to choose. The
same holds in eval mode, where BatchNorm normalises with its running statistics.

With BatchNorm in train mode the episode policy of :mod:`pymeta.core.norms` applies:
each task is normalised with the statistics of its own batch and running statistics
stay untouched. That needs a task-batched execution strategy (:class:`pymeta.core.batched.TaskBatched`),
and which is fastest depends on the model and the device: on a 2-core CPU a per-task
``"loop"`` embeds the conv4 backbone (32 tasks x 80 images, forward and backward) about
8x faster than ``vmap`` (whose folded ``[T * B, 64, 28, 28]`` activations make BatchNorm
and max-pooling slow there) and about 2x faster than ``"lowered"``; on a GPU one big
batched call is what fills the device. ``strategy="auto"`` therefore times the
candidates on the first episodes (:class:`pymeta.core.batched.StrategyPicker`) and keeps
the fastest; the learner stores the picker as an attribute so training checkpoints
record and restore the choice (``pymeta.training``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pymeta.core.batched import StrategyPicker, TaskBatched, check_strategy
from pymeta.core.norms import has_batch_norm, uses_batch_statistics

# How BatchNorm batches the support and query examples of a task (ProtoNet's ``batch_stats``).
BATCH_STATS = ("joint", "separate")


def embedding_picker(batched: TaskBatched, strategy: str) -> StrategyPicker | None:
    """The strategy picker for embedding with ``batched.module``'s own weights.

    ``strategy`` is checked (``"auto"`` or a concrete strategy). ``None`` when the module
    has no BatchNorm: :func:`embed_episode` then flattens the tasks into one batch
    whatever the strategy, so there is nothing to choose (or to record in a checkpoint).
    """
    check_strategy(strategy)
    if not has_batch_norm(batched.module):
        return None
    return batched.picker(strategy)


def embed_episode(
    batched: TaskBatched,
    picker: StrategyPicker | None,
    support_x: Tensor,
    query_x: Tensor,
    batch_stats: str = "joint",
) -> tuple[Tensor, Tensor]:
    """Embeddings of every task's support and query examples.

    Args:
        batched: the embedding network (``TaskBatched(module)``).
        picker: its :func:`embedding_picker` (``None``: the network has no BatchNorm).
        support_x: ``[T, S, ...]``.
        query_x: ``[T, Q, ...]`` (same trailing shape as ``support_x``).
        batch_stats: where BatchNorm takes each task's statistics: ``"joint"`` over its
            support and query examples together (one batch of S + Q), ``"separate"``
            over its support examples for the support embeddings and over its query
            examples for the query embeddings (two batches). Without BatchNorm in train
            mode both are the same function and the examples of all tasks run as one batch.

    Returns:
        ``([T, S, ...], [T, Q, ...])`` embeddings.
    """
    shots = support_x.shape[1]
    if picker is None or not uses_batch_statistics(batched.module):
        # No BatchNorm, or all of it in eval mode on running statistics: every example
        # is independent of the others, so the tasks run as one flat batch.
        z = batched.flat(torch.cat([support_x, query_x], dim=1))
        return z[:, :shots], z[:, shots:]
    with picker.timed() as strategy:
        if batch_stats == "separate":
            return batched.forward({}, support_x, strategy), batched.forward({}, query_x, strategy)
        z = batched.forward({}, torch.cat([support_x, query_x], dim=1), strategy)
        return z[:, :shots], z[:, shots:]
