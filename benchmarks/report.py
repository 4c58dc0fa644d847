"""What ``bench_meta.py`` writes: CSV rows, the table (printed last), the targets, a plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from runner import Entry
from workloads import WORKLOADS


def paired_ratio(num: Entry | None, den: Entry | None) -> float | None:
    """Median over rounds of ``den_time / num_time``: how many times faster ``num`` is."""
    if not (num and den and num.ok and den.ok and num.times and den.times):
        return None
    a = dict(zip(num.rounds, num.times, strict=True))
    b = dict(zip(den.rounds, den.times, strict=True))
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return statistics.median(b[r] / a[r] for r in common)


def baseline_name(workload: str) -> str:
    """The library each workload's speed-ups are relative to."""
    return WORKLOADS[workload].baseline


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "" if x is None else format(x, spec)


def _kernels(e: Entry, device: str) -> str:
    """The kernels column: the count on CUDA, ``n/a`` on CPU (nothing to count)."""
    if device != "cuda":
        return "n/a"
    return "" if e.kernels is None else str(e.kernels)


def _fraction_of_peak(e: Entry, peak: float) -> float | None:
    return e.flops / e.median / peak if e.ok and e.times and e.flops else None


def rows_for_csv(entries: list[Entry], peak: float, threads: int, device: str = "cpu") -> list[dict[str, Any]]:
    """One CSV row per (workload, library); ``kernels`` is ``n/a`` on CPU."""
    by_key = {(e.workload, e.library): e for e in entries}
    rows = []
    for e in entries:
        timed = e.ok and bool(e.times)
        ops = e.ops
        rows.append({
            "workload": e.workload,
            "group": WORKLOADS[e.workload].group,
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
            "cold_first_call_s": _fmt(e.cold_s),
            "baseline": baseline_name(e.workload),
            "speedup_vs_baseline": _fmt(paired_ratio(e, by_key.get((e.workload, baseline_name(e.workload))))),
            "speedup_vs_torch_func": _fmt(paired_ratio(e, by_key.get((e.workload, "torch.func")))),
            "aten_ops": ops.total if ops else "",
            "aten_ops_non_view": ops.non_view if ops else "",
            "custom_ops": sum(n for k, n in ops.by_op.items() if "::" in k) if ops else "",
            "kernels": _kernels(e, device) if e.ok else "",
            "peak_mib": _fmt(None if e.peak_bytes is None else e.peak_bytes / 2**20),
            "mflop": _fmt(None if e.flops is None else e.flops / 1e6, ".6g"),
            "fraction_of_matmul_peak": _fmt(_fraction_of_peak(e, peak)),
            "grad_check": e.grad_check,
            "warmup_calls": e.warmup_calls,
            "times_ms": ";".join(f"{1e3 * t:.4g}" for t in e.times),
        })  # fmt: skip
    return rows


def print_table(entries: list[Entry], peak: float, threads: int, device: str = "cpu") -> None:
    """The results table (printed last)."""
    by_key = {(e.workload, e.library): e for e in entries}
    head = (f"{'workload':23s} {'library':22s} {'strategy':9s} {'tasks/s':>10s} {'ms/step':>9s} "
            f"{'x base':>7s} {'cold s':>7s} {'ATen ops':>9s} {'non-view':>9s} {'kernels':>8s} "
            f"{'peak MiB':>9s} {'MFLOP':>9s} {'%peak':>6s}  grad check")  # fmt: skip
    print(f"\nmeta-step per library on {device}: median over "
          f"{max((len(e.times) for e in entries), default=0)} "
          f"interleaved rounds, {threads} thread(s); x base = speed-up over learn2learn "
          f"(easyfsl for the metric learners, groups c, e, f), median of per-round ratios; cold s = first call of a "
          f"compiled step (compiles forward and backward); kernels = CUDA kernel launches per "
          f"meta-step (n/a on CPU); ATen ops and (on CPU) peak memory are not measurable under "
          f"torch.compile (-); %peak = achieved FLOP/s / fp32 matmul peak "
          f"({peak / 1e9:.1f} GFLOP/s)")  # fmt: skip
    print(head)
    print("-" * len(head))
    last = None
    for e in entries:
        if last is not None and e.workload != last:
            print()
        last = e.workload
        if not e.ok:
            cold = f" (cold first call {e.cold_s:.1f} s)" if e.cold_s is not None else ""
            print(f"{e.workload:23s} {e.library:22s} {e.status}{cold}")
            continue
        timed = bool(e.times)
        ratio = paired_ratio(e, by_key.get((e.workload, baseline_name(e.workload))))
        peak_mib = None if e.peak_bytes is None else e.peak_bytes / 2**20
        share = _fraction_of_peak(e, peak)
        print(
            f"{e.workload:23s} {e.library:22s} {e.strategy or '-':9s} "
            f"{_fmt(e.tasks_per_s if timed else None, '10.1f') or '-':>10s} "
            f"{_fmt(1e3 * e.median if timed else None, '9.2f') or '-':>9s} {_fmt(ratio, '7.2f') or '-':>7s} "
            f"{_fmt(e.cold_s, '7.1f') or '-':>7s} "
            f"{e.ops.total if e.ops else '-':>9} {e.ops.non_view if e.ops else '-':>9} "
            f"{_kernels(e, device) or '-':>8s} {_fmt(peak_mib, '9.2f') or '-':>9s} "
            f"{_fmt(None if e.flops is None else e.flops / 1e6, '9.1f') or '-':>9s} "
            f"{_fmt(None if share is None else 100 * share, '6.2f') or '-':>6s}  "
            f"{e.grad_check}"
        )


def goal_lines(entries: list[Entry], logit_diffs: dict[str, float], peak: float) -> list[str]:
    """The targets: measured ratio vs goal, per workload."""
    by_key = {(e.workload, e.library): e for e in entries}

    def verdict(value: float | None, goal: float, at_least: bool) -> str:
        if value is None:
            return "n/a"
        return "MET" if (value >= goal if at_least else value <= goal) else "MISSED"

    def speed(w: str, peer: str, goal: float, ours_name: str = "pymeta") -> str:
        ours, theirs = by_key.get((w, ours_name)), by_key.get((w, peer))
        label = f"tasks/s {ours_name} / {peer}"
        if ours is None or theirs is None:
            return f"{label}: n/a (not run)"
        if not (ours.ok and theirs.ok):
            return f"{label}: n/a ({theirs.status if not theirs.ok else ours.status})"
        r = paired_ratio(ours, theirs)
        if r is None:
            return f"{label}: n/a (not timed)"
        return f"{label} = {r:.2f}x (goal >= {goal:g}x) {verdict(r, goal, True)}"

    def ops(w: str, peer: str, goal: float) -> str:
        ours, theirs = by_key.get((w, "pymeta")), by_key.get((w, peer))
        if not (ours and theirs and ours.ops and theirs.ops):
            return f"ATen ops pymeta / {peer}: n/a"
        r = ours.ops.total / theirs.ops.total
        return (f"ATen ops pymeta / {peer} = {ours.ops.total}/{theirs.ops.total} = 1/{1 / r:.1f} "
                f"(goal <= 1/{1 / goal:g}) {verdict(r, goal, False)}")  # fmt: skip

    def memory(w: str, peer: str, ours_name: str = "pymeta", goal: float | None = 1.0) -> str:
        """Peak memory ratio; ``goal``: the largest ratio that meets the target (None: no target)."""
        ours, theirs = by_key.get((w, ours_name)), by_key.get((w, peer))
        if not (ours and theirs and ours.peak_bytes is not None and theirs.peak_bytes):
            return f"peak memory {ours_name} / {peer}: n/a"
        a, b = ours.peak_bytes, theirs.peak_bytes
        line = f"peak memory {ours_name} / {peer} = {a / 2**20:.1f}/{b / 2**20:.1f} MiB = {a / b:.2f}x"
        return line if goal is None else f"{line} (goal <= {goal:g}x) {verdict(a / b, goal, False)}"

    def matmul_share(w: str, goal: float) -> str:
        ours = by_key.get((w, "pymeta"))
        share = _fraction_of_peak(ours, peak) if ours else None
        return f"pymeta fraction of fp32 matmul peak = {_fmt(share, '.2f') or 'n/a'} (goal >= {goal:g}) " + verdict(
            share, goal, True
        )

    def compile_times(w: str) -> list[str]:
        return [f"{e.library}: cold first call {e.cold_s:.1f} s (goal for pymeta < 60 s)"
                for e in entries if e.workload == w and e.cold_s is not None]  # fmt: skip

    def trade_off(w: str) -> list[str]:
        """Every pymeta variant's memory and time against learn2learn's (no goal)."""
        theirs = by_key.get((w, "learn2learn"))
        return [memory(w, "learn2learn", e.library, goal=None)
                + f"; tasks/s {e.library} / learn2learn = {_fmt(paired_ratio(e, theirs), '.2f') or 'n/a'}x"
                for e in entries if e.workload == w and e.library.startswith("pymeta")]  # fmt: skip

    lines = []
    for w in dict.fromkeys(e.workload for e in entries):
        group = WORKLOADS[w].group
        if group in ("a", "d"):
            parts = [speed(w, "learn2learn", 10), speed(w, "torch.func", 1.2), ops(w, "learn2learn", 1 / 20),
                     speed(w, "torch.func[compile=1]", 1.3, "pymeta[compile=1]"), *compile_times(w)]  # fmt: skip
        elif group == "b":
            parts = [speed(w, "learn2learn", 1.5), speed(w, "torch.func", 1.0), matmul_share(w, 0.5),
                     memory(w, "learn2learn"), *compile_times(w)]  # fmt: skip
        elif group == "m":
            parts = trade_off(w)
        elif group == "e":
            parts = [speed(w, "easyfsl", 2), memory(w, "easyfsl", goal=0.5)]
        elif group == "f":
            parts = [speed(w, "easyfsl", 1.5), memory(w, "easyfsl", goal=None)]
        else:  # "c"
            parts = [speed(w, "easyfsl", 1.5)]
            parts += [f"logits max |pymeta - easyfsl| ({label}) = {diff:.2e}" for label, diff in logit_diffs.items()]
            parts += [] if logit_diffs else ["logits vs easyfsl: n/a (easyfsl unavailable)"]
        lines += [f"({group}) {w}:", *(f"      {p}" for p in parts)]
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
