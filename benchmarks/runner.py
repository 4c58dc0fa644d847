"""One library on one workload, for ``bench_meta.py``: build, warm up, measure, time.

An :class:`Entry` holds everything measured about one meta-step. :func:`prepare` warms it
up and takes the hardware-independent figures, :func:`time_round` one timing; a library
that cannot run is ``skipped: <reason>``, one that raises is ``failed: <first line of the
error>``, and neither is ever timed.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from measure import (
    OpCount,
    count_aten_ops,
    count_kernel_launches,
    flops,
    measure_all,
    peak_memory,
    synchronize,
)
from peers import MetaStep, PeerUnavailable, build
from torch import Tensor
from torch.utils.benchmark import Timer
from workloads import Workload

T = TypeVar("T")


@dataclass
class Entry:
    """One library on one workload: its meta-step and everything measured about it.

    ``ops`` and ``peak_bytes`` are None where they cannot be measured: for a compiled
    meta-step, ``torch.compile`` runs the original Python function instead of the
    compiled one while a ``TorchDispatchMode`` is active, so the op counter would count
    the eager step (its peak memory is read on CUDA only, from the allocator, which needs
    no dispatch mode). ``flops`` of a compiled step are counted on an eager call (see
    :func:`measure.flops`). ``cold_s``: wall time of the first call of a compiled step, which traces and
    compiles forward and backward (Inductor's on-disk caches off, see
    :func:`peers.compile_cold`).
    """

    workload: str
    library: str
    tasks: int
    status: str = "ok"  # "ok", "skipped: <reason>" or "failed: <error>"
    meta: MetaStep | None = None
    strategy: str = ""
    warmup_calls: int = 0
    estimate: float = 0.0  # seconds per step, from warm-up
    times: list[float] = field(default_factory=list)  # one per round
    rounds: list[int] = field(default_factory=list)  # the round of each time
    ops: OpCount | None = None
    peak_bytes: int | None = None
    flops: int | None = None
    kernels: int | None = None  # CUDA kernel launches per meta-step; None on CPU
    cold_s: float | None = None
    grad: Tensor | None = None
    grad_check: str = ""

    @property
    def ok(self) -> bool:
        """Whether this entry ran (so far) without being skipped or failing."""
        return self.status == "ok"

    def fail(self, exc: BaseException) -> None:
        """Record an error: the entry is reported as failed, with the error, not timed."""
        self.status = f"failed: {type(exc).__name__}: {str(exc).strip()}".splitlines()[0][:200]
        self.meta = None
        print(f"  {self.workload} / {self.library}: {self.status}", flush=True)
        traceback.print_exc(limit=-3)

    @property
    def median(self) -> float:
        """Median seconds per meta-step over the timed rounds."""
        return statistics.median(self.times)

    @property
    def tasks_per_s(self) -> float:
        """Tasks per second: T / median meta-step time."""
        return self.tasks / self.median


def build_step(workload: Workload, library: str, **problem: Any) -> MetaStep:
    """``library``'s meta-step of ``workload``; ``problem``: ``tasks``, ``dtype``, ``device``
    (:meth:`workloads.Workload.problem`). Raises :class:`peers.PeerUnavailable`."""
    return build(library, workload.problem(**problem), **workload.pymeta_options)


def build_entry(workload: Workload, library: str, tasks: int | None, device: str) -> Entry:
    """Build ``library``'s meta-step of ``workload``; a missing library gives a skipped entry."""
    entry = Entry(workload.name, library, tasks or workload.problem().data.num_tasks)
    try:
        entry.meta = build_step(workload, library, tasks=tasks, device=device)
    except PeerUnavailable as exc:
        entry.status = f"skipped: {exc.reason}"
    except Exception as exc:  # a library that breaks is reported, never timed
        entry.fail(exc)
    return entry


def _timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """``fn()`` and the wall time of the call (waiting for the GPU)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def prepare(entry: Entry, warmup: int, device: str = "cpu", self_check: bool = False, max_calls: int = 64) -> None:
    """Warm up, measure and snapshot the gradient of ``entry`` before it is timed.

    1. ``warmup`` plain meta-steps (the first of a compiled step compiles: ``cold_s``);
       eager pymeta ``"auto"`` takes as many as it needs to settle on a strategy (it times its
       candidates on these calls; at worst a warm-up call, 15 trials per candidate and
       the call that decides: 32 for two candidates, well within ``max_calls``).
    2. One call counting ATen ops and peak memory, one counting FLOPs
       (:func:`measure.measure_all`; see :class:`Entry` for compiled steps): these also
       warm up, and the fastest is an upper bound of the step time, which picks how
       rounds are timed (:func:`time_round`). On CUDA, a third call counts
       kernel launches (:func:`measure.count_kernel_launches`).
    3. The meta-gradient left by the last call, for the gradient check.

    ``self_check``: also verify that ``measure_all``'s stacked op count and peak memory
    equal separate counts (two more calls).

    The previous ``.grad`` fields are dropped before the measured calls (the step drops
    them first anyway): on CUDA, where the peak is the allocator's reading relative to the
    start of the call, they would otherwise be freed inside it and offset the figure.
    """
    assert entry.meta is not None
    meta = entry.meta
    calls = 0
    try:
        for _ in range(max(warmup, 1)):
            _, seconds = _timed(meta.step, device)
            if calls == 0 and meta.compiled:
                entry.cold_s = seconds
            calls += 1
        if meta.strategy is not None and not meta.compiled:
            while meta.strategy() is None and calls < max_calls:
                meta.step()
                calls += 1
            if meta.strategy() is None:
                raise RuntimeError(f"pymeta chose no strategy in {max_calls} calls")
        if meta.strategy is not None:  # compiled: whatever the traced code settled on, if anything
            entry.strategy = str(meta.strategy() or "")
        for p in meta.params:
            p.grad = None
        measured = []  # seconds of the measured calls
        if not meta.compiled:
            (entry.ops, entry.peak_bytes), seconds = _timed(lambda: _ops_and_memory(meta, device, self_check), device)
            measured.append(seconds)
        elif device == "cuda":
            entry.peak_bytes, seconds = _timed(lambda: peak_memory(meta.step, device), device)
            measured.append(seconds)
        entry.flops, seconds = _timed(lambda: flops(meta.step), device)
        measured.append(seconds)
        entry.kernels = count_kernel_launches(meta.step, device)
    except Exception as exc:
        entry.fail(exc)
        return
    entry.warmup_calls = calls + len(measured) + (entry.kernels is not None) + 2 * self_check
    entry.estimate = min(measured)
    entry.grad = meta.gradient().detach().clone()


def time_round(entry: Entry, min_run_time: float, threads: int, device: str = "cpu") -> float:
    """One timing of a meta-step: ``Timer.blocked_autorange``'s median for steps shorter
    than ``min_run_time``; else one call timed with ``perf_counter``, garbage collection
    off as in ``timeit`` (``Timer.timeit(1)`` would run two untimed warm-up calls first,
    and blocked_autorange one to size its blocks: 2-3x the cost of a multi-second step).

    On CUDA the work is asynchronous: ``Timer``'s clock synchronizes the device at every
    reading whenever an accelerator is available, and the ``perf_counter`` path calls
    ``torch.cuda.synchronize()`` before starting and before stopping the clock."""
    assert entry.meta is not None
    if entry.estimate >= min_run_time:
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return _timed(entry.meta.step, device)[1]
        finally:
            if gc_was_enabled:
                gc.enable()
    timer = Timer("step()", globals={"step": entry.meta.step}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _ops_and_memory(meta: MetaStep, device: str, self_check: bool) -> tuple[OpCount, int]:
    """ATen ops and peak memory of one call of an eager step (``measure_all``); with
    ``self_check``, assert that they equal separate counts (two more calls)."""
    measures = measure_all(meta.step, with_flops=False, device=device)
    if self_check:
        ops, peak = count_aten_ops(meta.step), peak_memory(meta.step, device)
        got = (measures.ops.total, measures.ops.non_view, measures.peak_bytes)
        if got != (ops.total, ops.non_view, peak):
            raise AssertionError(f"measure_all {got} != separate {(ops.total, ops.non_view, peak)}")
    return measures.ops, measures.peak_bytes
