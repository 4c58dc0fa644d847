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

import contextlib
import datetime
import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from pymeta import _leftovers, _validate

DEFAULT_TIMEOUT = 120.0  # seconds a collective waits for a missing rank before failing
LAUNCH_PREFIX = "pymeta-launch-"  # + owner_tag(): the folder where launch's ranks report
_STOP_WAIT = 30.0  # seconds rank 0 gets to stop after a Ctrl-C (then, as the others, SIGKILL)

Batch = TypeVar("Batch")


class WorkerError(RuntimeError):
    """A rank started by :func:`launch` failed; the message holds its traceback."""

    def __init__(self, rank: int, world_size: int, details: str) -> None:
        super().__init__(f"rank {rank} of {world_size} failed:\n{details.strip()}")
        self.rank = rank
        self.details = details


def _group() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return _group()[1] > 1


def rank() -> int:
    """This process's rank in the default group (0 without a group)."""
    return _group()[0]


def world_size() -> int:
    """Number of ranks in the default group (1 without a group)."""
    return _group()[1]


def shard_range(total: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The items ``rank`` owns of ``total``: contiguous, sizes differ by at most one.

    The first ``total % world_size`` ranks own one item more (T = 5 on 2 ranks: rank 0
    owns tasks 0-2, rank 1 tasks 3-4). Defaults: this process's rank and group size.
    """
    _validate.non_negative_int("total", total)
    group_rank, group_size = _group()
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


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Iterator[bool]:
    """Join the process group described by torchrun's environment for the block.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK``
    for the GPU). Yields True when a group of more than one rank is active. Nothing
    happens when a group already exists (it is left alone) or ``WORLD_SIZE`` is unset
    or 1. ``backend`` None: gloo for CPU tensors and, with GPUs, nccl for CUDA ones; each
    rank then uses GPU ``LOCAL_RANK`` as its current device (``"cuda"`` means it).
    ``timeout``: seconds any collective waits for a missing rank before it raises.
    """
    create = not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if create:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpu = torch.cuda.is_available() and local < torch.cuda.device_count() and dist.is_nccl_available()
        if gpu:
            # One GPU per rank: "cuda" then means this rank's GPU, and nccl runs there.
            torch.cuda.set_device(local)
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield is_active()
    finally:
        if create:
            dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (for the rendezvous of :func:`launch`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    backend: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Run ``fn(*args)`` in ``nproc`` new local processes forming one process group.

    The single-machine equivalent of ``torchrun --nproc-per-node nproc``: processes are
    spawned (``torch.multiprocessing``, so ``fn`` and ``args`` must be picklable: ``fn``
    a module-level function), meet on a free port of 127.0.0.1, and each runs ``fn``
    inside :func:`process_group`. Each gets ``cores // nproc`` torch threads (unless
    ``OMP_NUM_THREADS`` is set), so the ranks do not oversubscribe the CPU.

    Raises:
        WorkerError: the rank that failed first, with its traceback (a failure makes
            the other ranks' collectives fail too; theirs are consequences). The other
            ranks are stopped at once, and a stalled rank makes the others fail after
            ``timeout`` seconds, so nothing hangs.
    """
    _validate.positive_int("nproc", nproc)
    _validate.positive_float("timeout", timeout)
    _leftovers.remove_stale_folders(Path(tempfile.gettempdir()), LAUNCH_PREFIX)
    with tempfile.TemporaryDirectory(prefix=f"{LAUNCH_PREFIX}{_leftovers.owner_tag()}-") as failures:
        context = mp.start_processes(
            _worker, args=(fn, args, nproc, free_port(), backend, timeout, failures),
            nprocs=nproc, join=False, start_method="spawn",
        )
        try:
            while not context.join():
                pass
        except KeyboardInterrupt:
            _stop(context.processes)
            raise _interrupted(failures) or KeyboardInterrupt("interrupted") from None
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            if _interrupted(failures):  # rank 0 got a SIGINT; the others failed because it stopped
                raise _interrupted(failures) from None
            # torch reports the first process it saw exit, which may be a rank that
            # failed *because* another one died: prefer the earliest recorded failure.
            reports = sorted(Path(failures).iterdir(), key=lambda f: float(f.read_text().split("\n", 1)[0]))
            if not reports:
                raise WorkerError(exc.error_index, nproc, str(exc)) from None
            first = reports[0]
            raise WorkerError(int(first.name), nproc, first.read_text().split("\n", 1)[1]) from None


def _interrupted(failures: str) -> KeyboardInterrupt | None:
    """Rank 0's report of a Ctrl-C, if it wrote one."""
    report = Path(failures, "interrupted")
    return KeyboardInterrupt(report.read_text()) if report.is_file() else None


def _stop(processes: list[Any]) -> None:
    """After a Ctrl-C: SIGINT to rank 0 (which may have had one from the terminal too) and
    wait for it to stop and report; the other ranks, which write nothing, are killed
    then. A second Ctrl-C stops the wait."""
    try:
        if processes[0].is_alive():
            os.kill(processes[0].pid, signal.SIGINT)
        processes[0].join(_STOP_WAIT)
    except KeyboardInterrupt:
        pass
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


def _interrupt_once(signum: int, frame: Any) -> None:
    """A worker's SIGINT handler: the first one interrupts, later ones (a terminal's and
    the launcher's, say) must not cut the handling of the first short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker(
    index: int, fn: Callable[..., Any], args: tuple[Any, ...], nproc: int, port: int, backend: str | None,
    timeout: float, failures: str,
) -> None:
    """One rank of :func:`launch`: torchrun's environment, a thread budget, the group, ``fn``."""
    signal.signal(signal.SIGINT, _interrupt_once)
    # The OS sends a SIGINT when the launcher dies (PR_SET_PDEATHSIG, set by torch before
    # this runs), but not if it died while this rank was starting: check that case.
    if os.getppid() != mp.parent_process().pid:
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
        WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
    )
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // nproc))
    with process_group(backend, timeout):
        try:
            fn(*args)
        except KeyboardInterrupt as exc:
            if index == 0:
                Path(failures, "interrupted").write_text(str(exc) or "interrupted")
            raise
        except BaseException:
            # Recorded before the group is torn down, i.e. before any other rank can
            # fail because of this one.
            Path(failures, str(index)).write_text(f"{time.time()!r}\n{traceback.format_exc()}")
            raise
