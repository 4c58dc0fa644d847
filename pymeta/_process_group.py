"""The process group itself: who is in it (:func:`rank`, :func:`world_size`), joining the
one torchrun describes (:func:`process_group`), and starting local ranks (:func:`launch`).

Public through :mod:`pymeta.distributed`, whose docstring shows them in use.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from pymeta import _leftovers, _validate

DEFAULT_TIMEOUT = 120.0  # seconds a collective waits for a missing rank before failing
LAUNCH_PREFIX = "pymeta-launch-"  # + owner_tag(): the folder where launch's ranks report
_STOP_WAIT = 30.0  # seconds rank 0 gets to stop after a Ctrl-C (then, as the others, SIGKILL)
_FOLLOW_WAIT = 5.0  # then seconds the other ranks get to end on their own (their collectives fail)


class WorkerError(RuntimeError):
    """A rank started by :func:`launch` failed; the message holds its traceback."""

    def __init__(self, rank: int, world_size: int, details: str) -> None:
        super().__init__(f"rank {rank} of {world_size} failed:\n{details.strip()}")
        self.rank = rank
        self.details = details


def rank_and_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return rank_and_size()[1] > 1


def rank() -> int:
    """This process's rank in the default group (0 without a group)."""
    return rank_and_size()[0]


def world_size() -> int:
    """Number of ranks in the default group (1 without a group)."""
    return rank_and_size()[1]


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
    wait for it to stop and report, then briefly for the other ranks, which write nothing
    and fail once rank 0 is gone; what is still running is killed. A second Ctrl-C stops
    the waits."""
    try:
        if processes[0].is_alive():
            os.kill(processes[0].pid, signal.SIGINT)
        processes[0].join(_STOP_WAIT)
        # A rank killed holding resources (a semaphore, a half-written line) makes them
        # show up after the launcher's last line; a rank left to fail on rank 0's absence
        # releases them.
        deadline = time.monotonic() + _FOLLOW_WAIT
        for process in processes[1:]:
            process.join(max(0.0, deadline - time.monotonic()))
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


def _interrupt_when_orphaned(launcher: int) -> None:
    """SIGINT to this rank once its launcher is gone, checked every second: a backup for
    PR_SET_PDEATHSIG, whose signal was seen lost under load (a rank left sleeping with
    its handler installed, never called, and its launcher dead)."""
    while os.getppid() == launcher:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)


def _worker(
    index: int, fn: Callable[..., Any], args: tuple[Any, ...], nproc: int, port: int, backend: str | None,
    timeout: float, failures: str,
) -> None:
    """One rank of :func:`launch`: torchrun's environment, a thread budget, the group, ``fn``."""
    signal.signal(signal.SIGINT, _interrupt_once)
    # tqdm's default lock is a multiprocessing one, a named semaphore: a rank that dies
    # without cleanup leaks it, and Python's resource tracker then prints a warning after
    # the launcher's last line. Only rank 0 draws progress bars: a thread lock suffices.
    tqdm.set_lock(threading.RLock())
    # The OS sends a SIGINT when the launcher dies (PR_SET_PDEATHSIG, set by torch before
    # this runs), but not if it died while this rank was starting: check that case.
    launcher = mp.parent_process().pid
    if os.getppid() != launcher:
        return
    threading.Thread(target=_interrupt_when_orphaned, args=(launcher,), daemon=True).start()
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
