"""Task-sharded meta-training on ``torch.distributed`` (gloo on CPU, nccl on GPU).

A meta-batch of T tasks is split across the ranks of a process group: every rank draws
the *same* global meta-batch (same seed), keeps its contiguous slice of the tasks
(:func:`shard`), runs the batched inner loop on it, and the meta-gradients are then
averaged over all T tasks (:func:`all_reduce_grads`), each rank's gradient weighted by
its share of the tasks, so the result is exact for unequal shards (T = 5 on 2 ranks:
3 + 2 tasks). Every rank then takes the same optimizer step, so the parameters stay
identical and training equals single-process training up to rounding. The user's
model code does not change: it is the batch that is split, not the model.

Every algorithm fits this pattern: MAML, first-order MAML, Meta-SGD, ANIL and ProtoNet
back-propagate a query loss that is a mean over tasks; Reptile's ``outer_grad`` writes a
mean over tasks into ``.grad``; FineTune's pre-training shards the examples of its
supervised batch the same way.

A training script, started with ``torchrun --nproc-per-node 2 train.py``::

    import torch, torch.nn.functional as F
    import pymeta
    from pymeta import distributed
    from pymeta.data import Sinusoid
    from pymeta.models import mlp

    with distributed.process_group():            # reads torchrun's env; gloo / nccl
        torch.manual_seed(0)
        maml = pymeta.MAML(mlp(1, (40, 40), 1), lr=0.01, loss_fn=F.mse_loss)
        distributed.broadcast_parameters(maml)   # identical start on every rank
        opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
        for step, ep in zip(range(1000), Sinusoid(meta_batch=25, seed=0)):  # same seed
            local = distributed.shard(ep)        # this rank's tasks, e.g. 13 or 12 of 25
            pred = maml.episode(local.support_x, local.support_y, local.query_x)
            loss = F.mse_loss(pred, local.query_y)
            opt.zero_grad(); loss.backward()
            loss = distributed.all_reduce_grads(maml, local.num_tasks, ep.num_tasks, loss.item())
            opt.step()
            if distributed.rank() == 0 and step % 100 == 0:
                print(step, loss)                # the meta-loss over all 25 tasks

The ``pymeta`` command does all of this: ``pymeta train --nproc 2 ...`` spawns two local
processes (:func:`launch`), and ``torchrun --nproc-per-node 2 -m pymeta train ...`` (or
several nodes with torchrun's ``--nnodes``) runs the same training under torchrun. Only
rank 0 writes checkpoints and prints.

Failures: a rank that raises ends its process, which closes its connections, and the
other ranks' next collective fails; a rank that stalls makes the others fail after the
process-group ``timeout``. :func:`launch` then stops every rank and raises
:class:`WorkerError` with the failing rank's traceback.

Ctrl-C (or ``kill -INT`` of the launcher) reaches rank 0, and :func:`launch` raises
``KeyboardInterrupt`` with rank 0's message ("interrupted at step N; last checkpoint:
PATH" in training) once all ranks stopped. A killed launcher's ranks get a SIGINT from
the OS (Linux); the next :func:`launch` removes the folder it left in the temp directory.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pymeta import _validate
from pymeta._process_group import (
    DEFAULT_TIMEOUT,
    LAUNCH_PREFIX,
    WorkerError,
    free_port,
    is_active,
    launch,
    process_group,
    rank,
    rank_and_size,
    world_size,
)

__all__ = [
    "DEFAULT_TIMEOUT", "LAUNCH_PREFIX", "WorkerError", "all_reduce_grads", "broadcast_parameters", "free_port",
    "gather_tasks", "is_active", "launch", "process_group", "rank", "shard", "shard_range", "take", "world_size",
]

Batch = TypeVar("Batch")


def shard_range(total: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The items ``rank`` owns of ``total``: contiguous, sizes differ by at most one.

    The first ``total % world_size`` ranks own one item more (T = 5 on 2 ranks: rank 0
    owns tasks 0-2, rank 1 tasks 3-4). Defaults: this process's rank and group size.
    """
    _validate.non_negative_int("total", total)
    group_rank, group_size = rank_and_size()
    world = group_size if world_size is None else _validate.positive_int("world_size", world_size)
    index = group_rank if rank is None else _validate.non_negative_int("rank", rank)
    if index >= world:
        raise ValueError(f"rank must be < world_size = {world}, got {index}")
    base, extra = divmod(total, world)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def take(batch: Batch, items: range) -> Batch:
    """``batch`` (a tensor, an :class:`~pymeta.data.Episode` or another (named) tuple of
    tensors sharing their leading dim) restricted to the leading-dim ``items``."""
    if isinstance(batch, Tensor):
        return batch[items.start : items.stop]
    parts = [t[items.start : items.stop] for t in batch]
    return batch._make(parts) if hasattr(batch, "_make") else type(batch)(parts)


def shard(batch: Batch) -> Batch:
    """This rank's part of a global meta-batch: its slice of the tasks (dim 0).

    Args:
        batch: an :class:`~pymeta.data.Episode` (``support_x [T, S, ...]``,
            ``support_y [T, S]``, ``query_x [T, Q, ...]``, ``query_y [T, Q]``) or any
            tensor / (named) tuple of tensors with the same leading dim T (e.g. FineTune's
            ``(x [B, ...], y [B])`` pre-training batch).

    Returns:
        The same kind of batch with the ``len(shard_range(T))`` tasks of this rank
        (all T without a process group). Every rank must pass the same batch.
    """
    leading = _leading_size(batch)
    world = world_size()
    if leading < world:
        raise ValueError(
            f"batch has {leading} tasks but the process group has {world} ranks: every rank "
            "needs at least one task (use a meta-batch of at least the number of processes)"
        )
    return take(batch, shard_range(leading))


def _leading_size(batch: object) -> int:
    tensors = [batch] if isinstance(batch, Tensor) else list(batch)  # type: ignore[call-overload]
    for i, t in enumerate(tensors):
        _validate.tensor(f"batch[{i}]", t)
        if t.dim() == 0:
            raise ValueError(f"batch[{i}] must have a leading task dim, got a 0-dim tensor")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors must share their leading dim, got shapes {[tuple(t.shape) for t in tensors]}")
    return sizes.pop()


def all_reduce_grads(
    module: nn.Module, local_tasks: int, total_tasks: int, loss: float | None = None
) -> float | None:
    """Average the meta-gradients of ``module`` over all tasks of all ranks, in place.

    Each rank computed ``.grad`` as a mean over its ``local_tasks`` tasks; the result, on
    every rank, is ``sum_r (local_tasks_r / total_tasks) * grad_r``, the mean over all
    ``total_tasks`` tasks, exact for unequal shards. A parameter without a gradient on
    every rank keeps ``grad = None`` (as after a single-process backward). A learner's
    :meth:`~pymeta.algorithms.Learner.task_statistics` (e.g. MAML++'s per-step BatchNorm
    running statistics, a momentum update from the batch statistics of this rank's
    tasks) are averaged the same way: the update is linear in those statistics, so the
    result is the single-process one.

    Args:
        module: the learner; every parameter that requires grad takes part.
        local_tasks: tasks (or examples) behind this rank's gradients.
        total_tasks: tasks of the global meta-batch; the ranks' ``local_tasks`` must sum
            to it (checked).
        loss: this rank's mean loss over its tasks, to be averaged the same way.

    Returns:
        The loss averaged over all tasks (None if ``loss`` is None). Without a process
        group nothing is communicated and ``loss`` comes back unchanged.

    Gradients of one dtype travel in one flat buffer: one collective per dtype, plus
    one small float64 collective for the task counts, gradient presence and loss.
    """
    _validate.positive_int("total_tasks", total_tasks)
    if _validate.non_negative_int("local_tasks", local_tasks) > total_tasks:
        raise ValueError(f"local_tasks must be <= total_tasks = {total_tasks}, got {local_tasks}")
    if not is_active():
        return loss
    params = [p for p in module.parameters() if p.requires_grad]
    weight = local_tasks / total_tasks
    device = params[0].device if params else torch.device("cpu")
    # [local_tasks, loss * weight, has_grad per parameter]; float64 keeps the counts exact.
    meta = torch.tensor(
        [local_tasks, 0.0 if loss is None else loss * weight] + [p.grad is not None for p in params],
        dtype=torch.float64, device=device,
    )
    dist.all_reduce(meta)
    if int(meta[0]) != total_tasks:
        raise ValueError(f"local_tasks sum to {int(meta[0])} over the ranks, but total_tasks = {total_tasks}")
    has_grad = (meta[2:] > 0).tolist()
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if has_grad[i]:
            by_dtype.setdefault(p.dtype, []).append(i)
    for indices in by_dtype.values():
        group = [params[i] for i in indices]
        flat = torch.cat([(p.grad * weight if p.grad is not None else torch.zeros_like(p)).flatten() for p in group])
        dist.all_reduce(flat)
        for p, chunk in zip(group, flat.split([p.numel() for p in group]), strict=True):
            if p.grad is None:  # only another rank had a gradient for it
                p.grad = chunk.view_as(p).clone()
            else:
                p.grad.copy_(chunk.view_as(p))
    statistics = module.task_statistics() if hasattr(module, "task_statistics") else []
    with torch.no_grad():
        for dtype in dict.fromkeys(t.dtype for t in statistics):  # the same order on every rank
            group = [t for t in statistics if t.dtype == dtype]
            flat = torch.cat([t.flatten() * weight for t in group])
            dist.all_reduce(flat)
            for t, chunk in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(chunk.view_as(t))
    return None if loss is None else meta[1].item()


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op without a group)."""
    if not is_active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def gather_tasks(chunks: list[Tensor]) -> Tensor:
    """All ranks' per-task values, concatenated in global task order.

    Args:
        chunks: one tensor ``[n_b, ...]`` per global batch b, holding this rank's tasks of
            that batch (its :func:`shard_range`; may be empty). Every rank passes the
            same number of chunks.

    Returns:
        ``[sum of all n_b over ranks, ...]`` on every rank: batch 0's tasks of rank 0,
        rank 1, ..., then batch 1's, ..., i.e. the order of a single process.
    """
    if not is_active():
        return torch.cat(chunks)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, [c.cpu() for c in chunks])
    return torch.cat([per_rank[b] for b in range(len(chunks)) for per_rank in gathered])
