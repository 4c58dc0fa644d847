"""End-to-end meta-step benchmark: pymeta against the meta-learners people use today.

For every workload of ``peers.py`` and every library (pymeta, learn2learn, higher,
torch.func, easyfsl) one *meta-step* is: the inner loop on all T tasks, the mean query
loss over tasks, ``backward()`` -- leaving the meta-gradient in ``.grad``, no optimizer
step. All libraries get the same data, initial weights and hyperparameters.

Measured per workload and library:

* tasks/second: T / median meta-step time. Libraries are timed interleaved, round after
  round (the order rotates every round), so machine noise hits all alike; each round
  takes ``Timer.blocked_autorange`` for steps shorter than ``--min-run-time``, else one
  call timed with ``perf_counter`` (blocked_autorange would spend an extra call sizing its
  blocks, ``Timer.timeit`` two warm-up calls). Speed-ups are medians of the per-round ratios (paired, noise cancels).
  On CUDA both paths wait for the GPU: ``Timer`` synchronizes around its measurements
  whenever an accelerator is available, the ``perf_counter`` path calls
  ``torch.cuda.synchronize()`` before and after the call.
* dispatched ATen ops per meta-step (``TorchDispatchMode``; a custom op such as
  ``pymeta::inner_sgd`` counts as one), peak tensor memory of one meta-step (on CUDA:
  ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before
  it), FLOPs (``FlopCounterMode``, matmul/conv only) and the achieved fraction of the fp32
  matmul peak (a large ``torch.mm`` timed in the same run, on the same device).
* kernels: CUDA kernels launched by one meta-step (``torch.profiler`` device-side
  ``"kernel"`` events; memcpy/memset not counted, see ``measure.count_kernel_launches``),
  ``n/a`` on CPU.
* correctness: every library's meta-gradient against learn2learn's (float32; for
  conv4 second order also float64, with pymeta's ``vmap`` and ``loop`` strategies, where
  torch.func is known to be wrong through BatchNorm), and ProtoNet logits against
  easyfsl's.

pymeta runs with ``strategy="auto"``: it times its candidates on the first calls, which
happen during warm-up here; the strategy it settled on is reported. A library that
cannot run is reported as ``skipped: <reason>``, never with a number.

Output: a CSV (``benchmarks/results/meta.csv``), a bar chart of tasks/s per workload and
library (log scale, ``benchmarks/results/meta.png``), the goal lines of the issue
(measured ratio vs goal), and the table, printed last.

    python benchmarks/bench_meta.py [--workloads a b conv4-protonet ...] [--repeats N]
        [--threads N] [--quick] [--tasks T] [--device {cpu,cuda}] [--out-dir DIR]
    pymeta bench meta [same arguments]

``--device cuda`` puts every library's data and model on the current CUDA device (the
same numbers as on CPU: data and weights are generated on the CPU from fixed seeds, then
moved); without a CUDA device visible to torch it exits with an error, never falling back
to the CPU. There, ``--libraries pymeta "pymeta[cuda_graph=1]" learn2learn ...`` adds
pymeta with its meta-step captured once as a CUDA graph and replayed
(:class:`pymeta.CUDAGraphStep`): its ATen-op count is then that of a replay call (the
copies of the batch into the graph's inputs and the label checks), its FLOPs are not
seen (``-``), and its kernels column counts what the profiler sees of the replay.

Peers need their own venv (``benchmarks/README.md``); with any other Python they are
reported as skipped and pymeta and torch.func still run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `pymeta bench meta` runs this file with runpy, which does not put its folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse
import contextlib
import gc
import io
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from measure import (
    RESULTS,
    StepMeasures,
    count_kernel_launches,
    flops,
    matmul_peak_flops,
    measure_all,
    synchronize,
    write_csv,
)
from peers import (
    WORKLOADS,
    MetaStep,
    PeerUnavailable,
    Workload,
    flat_grad,
    parse_peer,
    protonet_logits,
)
from torch import Tensor
from torch.utils.benchmark import Timer

LIBRARIES = ("pymeta", "learn2learn", "higher", "torch.func", "easyfsl")

# The workload groups: (a) sinusoid MAML, (b) conv4 MAML, (c) ProtoNet, (d) Meta-SGD,
# and (m) the memory/time trade-off of long inner loops (opt-in: slow).
GROUPS: dict[str, tuple[str, ...]] = {
    "a": ("sinusoid-maml-1step", "sinusoid-maml-5step"),
    "b": ("conv4-maml-2nd", "conv4-maml-1st"),
    "c": ("conv4-protonet",),
    "d": ("sinusoid-metasgd-1step", "sinusoid-metasgd-5step"),
    "m": ("conv4-maml-5step", "conv4-maml-10step"),
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
DEFAULT_GROUPS = ("a", "b", "c", "d")

# float32 meta-gradient agreement with the reference (relative to its largest entry).
GRAD_TOL = {
    "sinusoid-maml-1step": 1e-5,
    "sinusoid-maml-5step": 1e-4,
    "sinusoid-metasgd-1step": 1e-5,
    "sinusoid-metasgd-5step": 1e-4,
    "conv4-maml-2nd": 1e-4,
    "conv4-maml-1st": 1e-4,
    "conv4-protonet": 1e-4,
    # Long inner loops at lr 0.4 amplify float32 rounding: at 5 steps and 32 tasks
    # learn2learn's own float32 meta-gradient is 3.4e-4 (pymeta's 3.9e-4) from the float64
    # one, while the float64 gradients agree to 2e-14 (the float64 check below).
    "conv4-maml-5step": 1e-2,
    "conv4-maml-10step": 1e-2,
}
F64_TOL = 1e-10


@dataclass
class Entry:
    """One library on one workload: its meta-step and everything measured about it."""

    workload: str
    library: str
    tasks: int
    status: str = "ok"  # "ok", "skipped: <reason>" or "failed: <error>"
    meta: MetaStep | None = None
    strategy: str = ""
    warmup_calls: int = 0
    estimate: float = 0.0  # seconds per step, from warm-up
    times: list[float] = field(default_factory=list)  # one per round (None-free)
    rounds: list[int] = field(default_factory=list)  # the round of each time
    measures: StepMeasures | None = None
    kernels: int | None = None  # CUDA kernel launches per meta-step; None on CPU
    grad: Tensor | None = None
    grad_check: str = ""
    grad_rel: float | None = None

    @property
    def ok(self) -> bool:
        """Whether this entry ran (so far) without being skipped or failing."""
        return self.status == "ok"

    def fail(self, exc: BaseException) -> None:
        """Record an error: the entry is reported as failed, with the error, not timed."""
        self.status = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        self.meta = None
        print(f"  {self.workload} / {self.library}: {self.status}", flush=True)
        traceback.print_exc(limit=3)

    @property
    def median(self) -> float:
        """Median seconds per meta-step over the timed rounds."""
        return statistics.median(self.times)

    @property
    def tasks_per_s(self) -> float:
        """Tasks per second: T / median meta-step time."""
        return self.tasks / self.median


# --------------------------------------------------------------------------------------
# Steps: build, warm up, check, time, measure
# --------------------------------------------------------------------------------------


def build(workload: Workload, library: str, overrides: dict[str, Any]) -> Entry:
    """Build ``library``'s meta-step of ``workload``; a missing peer gives a skipped entry."""
    entry = Entry(workload.name, library, overrides.get("tasks", _default_tasks(workload)))
    try:
        entry.meta = workload.build(library, **overrides)
    except PeerUnavailable as exc:
        entry.status = f"skipped: {exc.reason}"
    except Exception as exc:  # a library that breaks is reported, never timed
        entry.fail(exc)
    return entry


def _default_tasks(workload: Workload) -> int:
    """T of a workload when not overridden (the builder's default)."""
    import inspect

    return int(inspect.signature(workload.builder).parameters["tasks"].default)


def prepare(
    entry: Entry,
    warmup: int,
    self_check: bool = False,
    max_calls: int = 64,
    device: torch.device | str = "cpu",
) -> None:
    """Warm up, measure and snapshot the gradient of ``entry`` before it is timed.

    1. ``warmup`` plain meta-steps; pymeta ``"auto"`` takes as many as it needs to settle
       on a strategy (it times its candidates on these calls; at worst a warm-up call, 15
       trials per candidate and the call that decides: 32 for two candidates, well
       within ``max_calls``).
    2. One call counting ATen ops and peak memory, one counting FLOPs
       (:func:`measure.measure_all`): these also warm up, and the faster of the two is an
       upper bound of the step time, which picks how rounds are timed (:func:`time_round`).
       On CUDA, a third call counts kernel launches (:func:`measure.count_kernel_launches`).
    3. The meta-gradient left by the last call, for the gradient check.

    The previous ``.grad`` fields are dropped before the measured calls (the step drops
    them first anyway): on CUDA, where the peak is the allocator's reading relative to the
    start of the call, they would otherwise be freed inside it and offset the figure.
    """
    assert entry.meta is not None
    meta = entry.meta
    calls = 0
    try:
        for _ in range(warmup):
            meta.step()
            calls += 1
        if meta.strategy is not None:
            while meta.strategy() is None and calls < max_calls:
                meta.step()
                calls += 1
            if meta.strategy() is None:
                raise RuntimeError(f"pymeta chose no strategy in {max_calls} calls")
            entry.strategy = str(meta.strategy())
        for p in meta.params:
            p.grad = None
        synchronize(device)
        start = time.perf_counter()
        entry.measures = measure_all(meta.step, with_flops=False, device=device)
        synchronize(device)
        mid = time.perf_counter()
        flop = flops(meta.step)
        synchronize(device)
        end = time.perf_counter()
        entry.measures = entry.measures._replace(flops=flop)
        entry.kernels = count_kernel_launches(meta.step, device)
        if self_check:
            _self_check(meta.step, entry.measures, device)
    except Exception as exc:
        entry.fail(exc)
        return
    entry.warmup_calls = calls + 2 + (entry.kernels is not None)
    entry.estimate = min(mid - start, end - mid)
    entry.grad = flat_grad(meta.params).detach().clone()


def time_round(
    entry: Entry, min_run_time: float, threads: int, device: torch.device | str = "cpu"
) -> float:
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
            synchronize(device)
            start = time.perf_counter()
            entry.meta.step()
            synchronize(device)
            return time.perf_counter() - start
        finally:
            if gc_was_enabled:
                gc.enable()
    timer = Timer("step()", globals={"step": entry.meta.step}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def check_gradients(entries: list[Entry], reference: Entry | None) -> None:
    """Compare each entry's float32 meta-gradient (from its last warm-up call) with the
    reference library's; fills ``grad_check``."""
    if reference is None or reference.grad is None:
        for e in entries:
            if e.ok:
                e.grad_check = "no reference"
        return
    tol = GRAD_TOL[reference.workload]
    print(f"  meta-gradients (float32) vs {reference.library}, tolerance {tol:g} relative:")
    for e in entries:
        if not e.ok or e.grad is None:
            continue
        if e is reference:
            e.grad_check = "reference"
            continue
        if e.grad.shape != reference.grad.shape:
            e.grad_check = f"shape {tuple(e.grad.shape)} != {tuple(reference.grad.shape)}"
            print(f"    {e.library:12s} {e.grad_check}")
            continue
        err = (e.grad - reference.grad).abs().max().item()
        e.grad_rel = err / max(reference.grad.abs().max().item(), 1e-300)
        verdict = "ok" if e.grad_rel <= tol else "DIFFERS"
        e.grad_check = f"{e.grad_rel:.1e} {verdict}"
        print(f"    {e.library:12s} max abs {err:.3e}, rel {e.grad_rel:.3e}  [{verdict}]")


def check_float64(workload: Workload, tasks: int, device: torch.device | str = "cpu") -> list[str]:
    """Meta-gradients of learn2learn, higher, torch.func and pymeta (both concrete
    strategies) on ``workload`` with ``tasks`` tasks, in float64 against learn2learn's
    float64 (exactness), and in float32 against the same float64 reference (each
    library's float32 rounding level); lines to print."""
    libs = [lib for lib in ("learn2learn", "higher", "torch.func", "pymeta[lowered]", "pymeta[vmap]", "pymeta[loop]")
            if parse_peer(lib)[0] in workload.peers]
    lines = [f"  meta-gradients with {tasks} tasks vs learn2learn's float64 "
             f"(rel = max abs / max |ref|; float64 tolerance {F64_TOL:g}):"]  # fmt: skip
    grads: dict[tuple[str, torch.dtype], Tensor] = {}
    for lib in libs:
        for dtype in (torch.float64, torch.float32):
            try:
                meta = workload.build(lib, dtype=dtype, tasks=tasks, device=device)
                meta.step()
                grads[(lib, dtype)] = flat_grad(meta.params).double()
            except PeerUnavailable as exc:
                lines.append(f"    {lib:12s} skipped: {exc.reason}")
                break
            except Exception as exc:
                lines.append(f"    {lib:12s} failed: {type(exc).__name__}: {exc}")
                break
    ref = grads.get(("learn2learn", torch.float64))
    if ref is None:
        return [*lines, "    (learn2learn unavailable: no reference)"]
    scale = ref.abs().max().item()
    for lib in libs:
        if (lib, torch.float64) not in grads:
            continue
        rel64 = (grads[(lib, torch.float64)] - ref).abs().max().item() / scale
        g32 = grads.get((lib, torch.float32))
        rel32 = "" if g32 is None else f", float32 rel {(g32 - ref).abs().max().item() / scale:.2e}"
        verdict = "ok" if rel64 <= F64_TOL else "DIFFERS"
        note = "  (expected: vmap + BatchNorm, functorch#534)" if lib == "torch.func" else ""
        if lib == "learn2learn":
            lines.append(f"    {lib:12s} float64 reference, max |g| = {scale:.4e}{rel32}")
        else:
            lines.append(f"    {lib:12s} float64 rel {rel64:.2e} [{verdict}]{rel32}{note}")
    return lines


def check_protonet_logits(
    tasks: int, device: torch.device | str = "cpu"
) -> tuple[list[str], dict[str, float]]:
    """pymeta ``ProtoNet(metric="euclidean", batch_stats="separate")`` logits vs easyfsl's,
    with the workload's BatchNorm encoder and with BatchNorm replaced by identity.

    Each library runs in float32 and float64: the float64 difference tells whether the two
    compute the same function, each library's float32-vs-float64 difference is its own
    rounding error, and the float32 difference is "equal to float32 rounding" when it is
    within the sum of the two. Returns lines to print and the float32 max abs differences.
    """
    lines = ["  ProtoNet logits, pymeta (metric='euclidean', batch_stats='separate') vs easyfsl "
             "(max abs differences; rel = / max |logit|):"]  # fmt: skip
    diffs: dict[str, float] = {}
    same_head, same_with_bn = False, False
    for label, batch_norm in (("conv4 with BatchNorm", True), ("conv4, BatchNorm->Identity", False)):
        try:
            logits = {
                (lib, dtype): protonet_logits(
                    lib, tasks=tasks, batch_norm=batch_norm, dtype=dtype, device=device
                ).double()
                for lib in ("pymeta", "easyfsl")
                for dtype in (torch.float32, torch.float64)
            }
        except PeerUnavailable as exc:
            lines.append(f"    {label}: skipped: {exc.reason}")
            continue
        f32, f64 = torch.float32, torch.float64

        def diff(
            a: tuple[str, torch.dtype], b: tuple[str, torch.dtype], logits: dict = logits
        ) -> float:
            return (logits[a] - logits[b]).abs().max().item()

        scale = logits[("easyfsl", f64)].abs().max().item()
        d32, d64 = diff(("pymeta", f32), ("easyfsl", f32)), diff(("pymeta", f64), ("easyfsl", f64))
        own = diff(("pymeta", f32), ("pymeta", f64)), diff(("easyfsl", f32), ("easyfsl", f64))
        diffs[label] = d32
        equal = d64 <= 1e-9 * scale and d32 <= sum(own)
        same_head |= equal and not batch_norm
        same_with_bn |= equal and batch_norm
        verdict = "equal to float32 rounding" if equal else "DIFFER"
        lines.append(
            f"    {label:27s} float32 {d32:.2e} (rel {d32 / scale:.1e}), float64 {d64:.2e}; "
            f"own float32 error pymeta {own[0]:.1e}, easyfsl {own[1]:.1e}  [{verdict}]"
        )
    if same_head and "conv4 with BatchNorm" in diffs and not same_with_bn:
        lines.append(
            "    -> same distance head, different BatchNorm embeddings: easyfsl normalises a "
            "task's support and query images in separate calls, which pymeta does only with "
            "ProtoNet(batch_stats='separate') (its default 'joint' normalises them together)"
        )
    return lines, diffs


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def paired_ratio(num: Entry, den: Entry) -> float | None:
    """Median over rounds of ``den_time / num_time``: how many times faster ``num`` is."""
    if not (num.ok and den.ok and num.times and den.times):
        return None
    a = dict(zip(num.rounds, num.times, strict=True))
    b = dict(zip(den.rounds, den.times, strict=True))
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return statistics.median(b[r] / a[r] for r in common)


def baseline_name(workload: str) -> str:
    """The library each workload's speed-ups are relative to."""
    return "easyfsl" if workload == "conv4-protonet" else "learn2learn"


def rows_for_csv(
    entries: list[Entry], peak: float, threads: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """One CSV row per (workload, library); ``kernels`` is ``n/a`` on CPU."""
    by_key = {(e.workload, e.library): e for e in entries}
    rows = []
    for e in entries:
        base = by_key.get((e.workload, baseline_name(e.workload)))
        tfunc = by_key.get((e.workload, "torch.func"))
        m = e.measures
        timed = e.ok and bool(e.times)
        row: dict[str, Any] = {
            "workload": e.workload,
            "group": GROUP_OF.get(e.workload, ""),
            "library": e.library,
            "status": e.status,
            "strategy": e.strategy,
            "tasks": e.tasks,
            "device": device,
            "threads": threads,
            "rounds": len(e.times),
            "tasks_per_s": f"{e.tasks_per_s:.6g}" if timed else "",
            "ms_per_step_median": f"{1e3 * e.median:.6g}" if timed else "",
            "ms_per_step_min": f"{1e3 * min(e.times):.6g}" if timed else "",
            "ms_per_step_max": f"{1e3 * max(e.times):.6g}" if timed else "",
            "baseline": baseline_name(e.workload),
            "speedup_vs_baseline": _fmt(paired_ratio(e, base) if base else None),
            "speedup_vs_torch_func": _fmt(paired_ratio(e, tfunc) if tfunc else None),
            "aten_ops": m.ops.total if m else "",
            "aten_ops_non_view": m.ops.non_view if m else "",
            "custom_ops": sum(n for k, n in m.ops.by_op.items() if "::" in k) if m else "",
            "kernels": _kernels(e, device) if m else "",
            "peak_mib": f"{m.peak_bytes / 2**20:.4g}" if m else "",
            "mflop": f"{m.flops / 1e6:.6g}" if m else "",
            "fraction_of_matmul_peak": (
                f"{m.flops / e.median / peak:.4g}" if m and timed and m.flops else ""
            ),
            "grad_check": e.grad_check,
            "warmup_calls": e.warmup_calls,
            "times_ms": ";".join(f"{1e3 * t:.4g}" for t in e.times),
        }
        rows.append(row)
    return rows


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "" if x is None else format(x, spec)


def _kernels(e: Entry, device: str) -> str:
    """The kernels column: the count on CUDA, ``n/a`` on CPU (nothing to count)."""
    if torch.device(device).type != "cuda":
        return "n/a"
    return "" if e.kernels is None else str(e.kernels)


def print_table(entries: list[Entry], peak: float, threads: int, device: str = "cpu") -> None:
    """The results table (printed last)."""
    by_key = {(e.workload, e.library): e for e in entries}
    head = (f"{'workload':23s} {'library':20s} {'strategy':11s} {'tasks/s':>10s} {'ms/step':>9s} "
            f"{'x base':>7s} {'ATen ops':>9s} {'non-view':>9s} {'kernels':>8s} {'peak MiB':>9s} "
            f"{'MFLOP':>9s} {'%peak':>6s}  grad check")  # fmt: skip
    print(f"\nmeta-step per library on {device}: median over "
          f"{max((len(e.times) for e in entries), default=0)} "
          f"interleaved rounds, {threads} thread(s); x base = speed-up over learn2learn "
          f"(easyfsl for conv4-protonet), median of per-round ratios; kernels = CUDA kernel "
          f"launches per meta-step (n/a on CPU); %peak = achieved FLOP/s "
          f"/ fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s)")  # fmt: skip
    print(head)
    print("-" * len(head))
    last = None
    for e in entries:
        if last is not None and e.workload != last:
            print()
        last = e.workload
        if not e.ok or not e.times:
            status = e.status if not e.ok else "not timed"
            print(f"{e.workload:23s} {e.library:20s} {status}")
            continue
        m = e.measures
        base = by_key.get((e.workload, baseline_name(e.workload)))
        ratio = paired_ratio(e, base) if base else None
        pct = 100 * m.flops / e.median / peak if m and m.flops else None
        print(
            f"{e.workload:23s} {e.library:20s} {e.strategy or '-':11s} {e.tasks_per_s:10.1f} "
            f"{1e3 * e.median:9.2f} {_fmt(ratio, '7.2f') or '-':>7s} "
            f"{m.ops.total if m else '-':>9} {m.ops.non_view if m else '-':>9} "
            f"{_kernels(e, device) or '-':>8s} "
            f"{(f'{m.peak_bytes / 2**20:.2f}' if m else '-'):>9s} "
            f"{(f'{m.flops / 1e6:.1f}' if m else '-'):>9s} {_fmt(pct, '6.2f') or '-':>6s}  "
            f"{e.grad_check}"
        )


def goal_lines(entries: list[Entry], logit_diffs: dict[str, float]) -> list[str]:
    """The issue's targets: measured ratio vs goal, per workload."""
    by_key = {(e.workload, e.library): e for e in entries}
    workloads = list(dict.fromkeys(e.workload for e in entries))
    lines = []

    def verdict(value: float | None, goal: float, at_least: bool) -> str:
        if value is None:
            return "n/a"
        return "MET" if (value >= goal if at_least else value <= goal) else "MISSED"

    def speed(w: str, peer: str, goal: float) -> str:
        ours, theirs = by_key.get((w, "pymeta")), by_key.get((w, peer))
        if ours is None or theirs is None:
            return f"tasks/s pymeta / {peer}: n/a (not run)"
        if not (ours.ok and theirs.ok):
            why = theirs.status if not theirs.ok else ours.status
            return f"tasks/s pymeta / {peer}: n/a ({why})"
        r = paired_ratio(ours, theirs)
        return f"tasks/s pymeta / {peer} = {r:.2f}x (goal >= {goal:g}x) {verdict(r, goal, True)}"

    def ops(w: str, peer: str, goal: float) -> str:
        ours, theirs = by_key.get((w, "pymeta")), by_key.get((w, peer))
        if not (ours and theirs and ours.measures and theirs.measures):
            return f"ATen ops pymeta / {peer}: n/a"
        r = ours.measures.ops.total / theirs.measures.ops.total
        return (f"ATen ops pymeta / {peer} = {ours.measures.ops.total}/"
                f"{theirs.measures.ops.total} = 1/{1 / r:.1f} (goal <= 1/{1 / goal:g}) "
                f"{verdict(r, goal, False)}")  # fmt: skip

    def memory(w: str, peer: str, ours_name: str = "pymeta", goal: bool = True) -> str:
        ours, theirs = by_key.get((w, ours_name)), by_key.get((w, peer))
        if not (ours and theirs and ours.measures and theirs.measures):
            return f"peak memory {ours_name} / {peer}: n/a"
        a, b = ours.measures.peak_bytes, theirs.measures.peak_bytes
        line = f"peak memory {ours_name} / {peer} = {a / 2**20:.1f}/{b / 2**20:.1f} MiB = {a / b:.2f}x"
        return f"{line} (goal <= 1x) {verdict(a / b, 1.0, False)}" if goal else line

    def trade_off(w: str) -> list[str]:
        """Every pymeta variant's memory and time against learn2learn's (no goal)."""
        parts = []
        for e in (e for e in entries if e.workload == w and e.library.startswith("pymeta")):
            theirs = by_key.get((w, "learn2learn"))
            r = paired_ratio(e, theirs) if e.ok and theirs is not None and theirs.ok else None
            parts.append(memory(w, "learn2learn", e.library, goal=False)
                         + f"; tasks/s {e.library} / learn2learn = {_fmt(r, '.2f')}x")  # fmt: skip
        return parts

    for w in workloads:
        group = GROUP_OF.get(w)
        if group in ("a", "d"):
            parts = [speed(w, "learn2learn", 10), speed(w, "torch.func", 1.2),
                     ops(w, "learn2learn", 1 / 20)]  # fmt: skip
        elif group == "b":
            parts = [speed(w, "learn2learn", 1.2), speed(w, "torch.func", 1.0),
                     memory(w, "learn2learn")]  # fmt: skip
        elif group == "m":
            parts = trade_off(w)
        elif group == "c":
            parts = [speed(w, "easyfsl", 1.0)]
            for label, diff in logit_diffs.items():
                parts.append(f"logits max |pymeta - easyfsl| ({label}) = {diff:.2e}")
            if not logit_diffs:
                parts.append("logits vs easyfsl: n/a (easyfsl unavailable)")
        else:
            continue
        lines.append(f"({group}) {w}:")
        lines += [f"      {p}" for p in parts]
    return lines


def plot(entries: list[Entry], path: Path, title: str) -> Path | None:
    """Grouped bar chart of tasks/s per workload and library, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no plot: matplotlib unavailable ({exc})")
        return None
    workloads = list(dict.fromkeys(e.workload for e in entries))
    libraries = list(dict.fromkeys(e.library for e in entries))
    by_key = {(e.workload, e.library): e for e in entries}
    width = 0.8 / max(len(libraries), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(workloads)), 5))
    for j, lib in enumerate(libraries):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            e = by_key.get((w, lib))
            if e is not None and e.ok and e.times:
                xs.append(i + (j - (len(libraries) - 1) / 2) * width)
                ys.append(e.tasks_per_s)
        if xs:
            ax.bar(xs, ys, width, label=lib)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, rotation=20, ha="right")
    ax.set_ylabel("tasks / second (meta-step, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def resolve_workloads(names: Sequence[str]) -> list[str]:
    """Workload names from names and group letters (a, b, c, d, m), in WORKLOADS order."""
    wanted: set[str] = set()
    for name in names:
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in WORKLOADS:
            wanted.add(name)
        else:
            raise SystemExit(
                f"unknown workload {name!r}: choose from {sorted(GROUPS)} or {list(WORKLOADS)}"
            )
    return [w for w in WORKLOADS if w in wanted]


def pymeta_backends() -> str:
    """One line: which pymeta op backends run here (first line of each reason)."""
    try:
        from pymeta import ops

        status = ops.backends()
    except Exception as exc:
        return f"pymeta unavailable: {type(exc).__name__}: {exc}"
    return "; ".join(f"{k}: {str(v).splitlines()[0][:90]}" for k, v in status.items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_GROUPS), metavar="NAME",
                   help="workload names or groups a b c d m (default: a b c d; m, long inner "
                        f"loops, is slow): {', '.join(WORKLOADS)}")
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), metavar="LIB",
                   help="libraries (default: all); pymeta with options adds a variant, e.g. "
                        "'pymeta[loop]' (a fixed strategy), 'pymeta[lowered,task_chunk=4]', "
                        "'pymeta[checkpoint_steps=1]'")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timing rounds (default 7; --quick: 2)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange measurement (default 0.3; --quick: 0.01)")
    p.add_argument("--warmup", type=int, default=1,
                   help="plain warm-up calls per library before its two measured calls "
                        "(default 1); pymeta 'auto' takes as many as it needs to choose")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's default, here "
                        f"{torch.get_num_threads()})")
    p.add_argument("--tasks", type=int, default=None,
                   help="override T (tasks per meta-step) of every workload (e.g. a tiny smoke run)")
    p.add_argument("--f64-tasks", type=int, default=4,
                   help="tasks of the float64 conv4 second-order gradient check (default 4)")
    p.add_argument("--no-checks", action="store_true",
                   help="skip the float64 and logits checks (the float32 gradient check stays)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few repeats, short timings, small matmul for the peak")
    p.add_argument("--self-check", action="store_true",
                   help="also verify that measure_all's stacked counts equal separate ones")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where data, models and the matmul-peak yardstick live (default cpu); "
                        "cuda: the current CUDA device, also counts kernel launches")
    p.add_argument("--out-dir", type=Path, default=RESULTS,
                   help="where meta.csv and meta.png go (default: benchmarks/results)")
    args = p.parse_args(argv)  # fmt: skip
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --device cuda: no CUDA device visible to torch (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); run on a machine with a GPU, or "
            "--device cpu"
        )
    q = args.quick
    args.repeats = args.repeats if args.repeats is not None else (2 if q else 7)
    args.min_run_time = args.min_run_time if args.min_run_time is not None else (0.01 if q else 0.3)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = args.device
    workloads = resolve_workloads(args.workloads)
    overrides: dict[str, Any] = {} if args.tasks is None else {"tasks": args.tasks}
    overrides["device"] = device
    started = time.perf_counter()
    load_before = os.getloadavg()

    print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
          f"{threads} thread(s), {os.cpu_count()} CPUs")  # fmt: skip
    device_name = "cpu"
    if device == "cuda":
        device_name = f"cuda ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})"
    print(f"device: {device_name}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    for lib in ("pymeta", "learn2learn", "higher", "easyfsl"):
        try:
            with _quiet_stderr():
                mod = __import__(lib)
            print(f"  {lib} {getattr(mod, '__version__', '')}".rstrip())
        except Exception as exc:
            print(f"  {lib}: unavailable ({type(exc).__name__}: {exc})")
    with _quiet_stderr():
        print(f"  pymeta op backends: {pymeta_backends()}")

    n = 256 if args.quick else 2048
    peak_before = matmul_peak_flops(n, min_run_time=0.1 if args.quick else 0.5,
                                    rounds=1 if args.quick else 3, device=device)  # fmt: skip
    print(f"fp32 matmul peak (torch.mm {n}x{n} on {device}, best of medians): "
          f"{peak_before / 1e9:.1f} GFLOP/s")  # fmt: skip

    entries: list[Entry] = []
    logit_diffs: dict[str, float] = {}
    extra_lines: list[str] = []
    for name in workloads:
        workload = WORKLOADS[name]
        print(f"\n== {name}: {workload.description}", flush=True)
        libs = [lib for lib in args.libraries if parse_peer(lib)[0] in workload.peers]
        group = [build(workload, lib, overrides) for lib in libs]
        entries += group
        for e in group:
            if not e.ok:
                print(f"  {e.library:12s} {e.status}")
        t0 = time.perf_counter()
        for e in group:
            if e.ok:
                prepare(e, args.warmup, args.self_check, device=device)
                if e.ok:
                    chosen = f", strategy {e.strategy}" if e.strategy else ""
                    measured = ("3 measured: ops/memory, FLOPs, kernels" if e.kernels is not None
                                else "2 measured: ops/memory, FLOPs")
                    print(f"  {e.library:12s} {e.warmup_calls} warm-up calls ({measured}), "
                          f"<= {1e3 * e.estimate:.1f} ms/step{chosen}", flush=True)  # fmt: skip
        print(f"  (warm-up and measurements took {time.perf_counter() - t0:.1f} s)")

        reference = next((e for e in group if e.library == baseline_name(name) and e.ok), None)
        check_gradients(group, reference)
        if not args.no_checks and (name == "conv4-maml-2nd" or GROUP_OF.get(name) == "m"):
            lines = check_float64(workload, args.f64_tasks, device)
            print("\n".join(lines), flush=True)
            extra_lines += [f"{name}:", *lines]
        if not args.no_checks and name == "conv4-protonet":
            lines, logit_diffs = check_protonet_logits(overrides.get("tasks", 32), device)
            print("\n".join(lines), flush=True)
            extra_lines += [f"{name}:", *lines]

        live = [e for e in group if e.ok]
        t0 = time.perf_counter()
        for r in range(args.repeats):
            shift = r % max(len(live), 1)
            for e in live[shift:] + live[:shift]:  # rotate the order every round
                if not e.ok:
                    continue
                try:
                    e.times.append(time_round(e, args.min_run_time, threads, device))
                    e.rounds.append(r)
                except Exception as exc:
                    e.fail(exc)
        print(f"  timed {args.repeats} rounds in {time.perf_counter() - t0:.1f} s: " + ", ".join(
            f"{e.library} {1e3 * e.median:.2f} ms" for e in live if e.ok and e.times))  # fmt: skip

        for e in live:
            e.meta = None  # free the models and graphs of this workload

    peak_after = matmul_peak_flops(n, min_run_time=0.1 if args.quick else 0.5,
                                   rounds=1 if args.quick else 3, device=device)  # fmt: skip
    peak = max(peak_before, peak_after)
    load_after = os.getloadavg()

    where = (torch.cuda.get_device_name() if device == "cuda"
             else platform.processor() or platform.machine())  # fmt: skip
    title = (f"pymeta vs peers, meta-step tasks/s ({where}, "
             f"{threads} thread(s), torch {torch.__version__}; load {load_before[0]:.1f} -> "
             f"{load_after[0]:.1f})")  # fmt: skip
    rows = rows_for_csv(entries, peak, threads, device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "meta.csv", rows)
    plot(entries, args.out_dir / "meta.png", title)

    print(f"\nfp32 matmul peak: {peak_before / 1e9:.1f} GFLOP/s before, "
          f"{peak_after / 1e9:.1f} after; using {peak / 1e9:.1f}")  # fmt: skip
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} CPUs)")
    print(f"total time {time.perf_counter() - started:.0f} s")
    strategies = [f"{e.workload}: {e.strategy}" for e in entries if e.library == "pymeta" and e.ok]
    if strategies:
        print("pymeta strategy chosen ('auto'): " + "; ".join(strategies))
    if extra_lines:
        print("\nchecks:")
        print("\n".join(extra_lines))
    goals = goal_lines(entries, logit_diffs)
    if goals:
        print("\ntargets (measured vs goal):")
        print("\n".join(goals))
    print_table(entries, peak, threads, device)
    return 0


def _quiet_stderr() -> contextlib.AbstractContextManager[Any]:
    """Silence stderr (gym's "unmaintained" notice when learn2learn is imported, the C++
    build log of a pymeta extension that fails to build: its reason is printed anyway)."""
    return contextlib.redirect_stderr(io.StringIO())


def _self_check(
    step: Callable[[], None], measures: StepMeasures, device: torch.device | str = "cpu"
) -> None:
    """Assert that the stacked-mode ops and memory of ``measure_all`` equal separate counts."""
    from measure import count_aten_ops, peak_memory

    ops, peak = count_aten_ops(step), peak_memory(step, device)
    got = (measures.ops.total, measures.ops.non_view, measures.peak_bytes)
    if got != (ops.total, ops.non_view, peak):
        raise AssertionError(f"measure_all {got} != separate {(ops.total, ops.non_view, peak)}")


if __name__ == "__main__":
    raise SystemExit(main())
