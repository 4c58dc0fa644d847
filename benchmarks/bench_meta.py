"""End-to-end meta-step benchmark: pymeta against the meta-learners people use today.

For every workload (``workloads.py``) and every library (``peers/``: pymeta, learn2learn,
higher, torch.func, easyfsl, and variants such as ``"torch.func[compile=1]"``) one
*meta-step* is: the inner loop on all T tasks, the mean query loss over tasks,
``backward()`` -- leaving the meta-gradient in ``.grad``, no optimizer step. All libraries
get the same data, initial weights and hyperparameters.

Measured per workload and library:

* tasks/second: T / median meta-step time. Libraries are timed interleaved, round after
  round (the order rotates every round), so machine noise hits all alike; each round
  takes ``Timer.blocked_autorange`` for steps shorter than ``--min-run-time``, else one
  call timed with ``perf_counter``. Speed-ups are medians of the per-round ratios
  (paired, noise cancels). On CUDA both paths wait for the GPU.
* compiled variants (``[compile=1]``): the cold first call (tracing and compiling forward
  and backward, Inductor's on-disk caches off) apart from the steady-state time. A
  library that ``torch.compile`` cannot handle is reported as failed with the error's
  first line, and the run goes on.
* dispatched ATen ops per meta-step (``TorchDispatchMode``; a custom op such as
  ``pymeta::inner_sgd`` counts as one), peak tensor memory of one meta-step (on CUDA:
  the caching allocator's peak), FLOPs (``FlopCounterMode``, matmul/conv only) and the
  achieved fraction of the fp32 matmul peak (a large ``torch.mm`` timed in the same run,
  on the same device); kernels: CUDA kernels launched by one meta-step (``n/a`` on CPU).
* correctness: every library's float32 meta-gradient against the baseline's
  (learn2learn; easyfsl for ProtoNet, RelationNet and MatchingNet); for conv4 second order also float64 (pymeta with
  each concrete strategy, and torch.func, known to be wrong through BatchNorm), and
  ProtoNet logits against easyfsl's.

pymeta runs with ``strategy="auto"``: it times its candidates on the first calls, which
happen during warm-up here; the strategy it settled on is reported. A library that
cannot run is reported as ``skipped: <reason>``, never with a number.

Output: ``OUT_DIR/meta.csv``, a bar chart of tasks/s (``OUT_DIR/meta.png``, log scale),
the targets (measured ratio vs goal), and the table, printed last.

    python benchmarks/bench_meta.py [--workloads a b conv4-protonet ...] [--libraries ...]
        [--repeats N] [--threads N] [--quick] [--tasks T] [--device {cpu,cuda}] [--out-dir DIR]
    pymeta bench meta [same arguments]

``--device cuda`` puts every library's data and model on the current CUDA device (the
same numbers as on CPU); without a CUDA device visible to torch it exits with an error,
never falling back to the CPU. There ``"pymeta[cuda_graph=1]"`` adds pymeta with its
meta-step captured once as a CUDA graph and replayed (:class:`pymeta.CUDAGraphStep`).
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
import io
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch
from checks import check_float64, check_gradients, check_protonet_logits
from measure import RESULTS, matmul_peak_flops, write_csv
from peers import LIBRARIES, supports
from report import baseline_name, goal_lines, plot, print_table, rows_for_csv
from runner import Entry, build_entry, prepare, time_round
from workloads import COMPILED, GROUPS, WORKLOADS

DEFAULT_GROUPS = ("a", "b", "c", "d", "e", "f")  # m, long inner loops, is opt-in: slow


def resolve_workloads(names: Sequence[str]) -> list[str]:
    """Workload names from names and group letters (``GROUPS``: a-f, m), in WORKLOADS order."""
    wanted: set[str] = set()
    for name in names:
        if name not in GROUPS and name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}: choose from {sorted(GROUPS)} or {list(WORKLOADS)}")
        wanted.update(GROUPS.get(name, (name,)))
    return [w for w in WORKLOADS if w in wanted]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_GROUPS), metavar="NAME",
                   help=f"workload names or groups {' '.join(GROUPS)} (default: {' '.join(DEFAULT_GROUPS)}; "
                        f"m, long inner loops, is slow): {', '.join(WORKLOADS)}")
    p.add_argument("--libraries", nargs="+", default=None, metavar="LIB",
                   help=f"libraries (default: each workload's, {', '.join(LIBRARIES)} and {', '.join(COMPILED)} "
                        "where they apply); options in brackets add a variant: '[compile=1]' for any "
                        "library, and pymeta's 'pymeta[loop]' (a fixed strategy), 'pymeta[lowered,task_chunk=4]', "
                        "'pymeta[checkpoint_steps=1]', 'pymeta[cuda_graph=1]' (--device cuda)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timing rounds (default 7; --quick: 2; 0: checks only, no timing)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange measurement (default 0.3; --quick: 0.01)")
    p.add_argument("--warmup", type=int, default=1,
                   help="plain warm-up calls per library before its measured calls (default 1, at least 1); "
                        "pymeta 'auto' takes as many as it needs to choose")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads (default: torch's default, here {torch.get_num_threads()})")
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
            f"CUDA build {torch.version.cuda or 'none'}); run on a machine with a GPU, or --device cpu"
        )
    q = args.quick
    args.repeats = args.repeats if args.repeats is not None else (2 if q else 7)
    args.min_run_time = args.min_run_time if args.min_run_time is not None else (0.01 if q else 0.3)
    if args.repeats < 0:
        p.error("--repeats must be >= 0")
    return args


def _quiet_stderr() -> contextlib.AbstractContextManager[Any]:
    """Silence stderr (gym's "unmaintained" notice when learn2learn is imported, the C++
    build log of a pymeta extension that fails to build: its reason is printed anyway)."""
    return contextlib.redirect_stderr(io.StringIO())


def print_environment(device: str, threads: int) -> None:
    """Versions, device, load, which libraries import and which pymeta backends run."""
    print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
          f"{threads} thread(s), {os.cpu_count()} CPUs")  # fmt: skip
    name = f"cuda ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if device == "cuda" else "cpu"
    print(f"device: {name}")
    for lib in ("pymeta", "learn2learn", "higher", "easyfsl"):
        try:
            with _quiet_stderr():
                mod = __import__(lib)
            print(f"  {lib} {getattr(mod, '__version__', '')}".rstrip())
        except Exception as exc:
            print(f"  {lib}: unavailable ({type(exc).__name__}: {exc})")
    try:
        with _quiet_stderr():
            from pymeta import ops

            status = ops.backends()
        print("  pymeta op backends: " + "; ".join(f"{k}: {str(v).splitlines()[0][:90]}" for k, v in status.items()))
    except Exception as exc:
        print(f"  pymeta op backends: unavailable ({type(exc).__name__}: {exc})")


def run_workload(name: str, args: argparse.Namespace, threads: int) -> tuple[list[Entry], list[str], dict[str, float]]:
    """Build, warm up, check and time every library of one workload; returns its entries,
    the check lines and (ProtoNet) the logit differences."""
    workload = WORKLOADS[name]
    print(f"\n== {name}: {workload.description}", flush=True)
    libs = workload.libraries if args.libraries is None else [
        lib for lib in args.libraries if supports(lib, workload.algorithm)
    ]
    if any("compile=1" in lib for lib in libs):
        # A fresh compile cache per workload: compiled code of earlier workloads (same
        # functions, other shapes) must not count towards the recompile limit.
        import torch._dynamo

        torch._dynamo.reset()
    group = [build_entry(workload, lib, args.tasks, args.device) for lib in libs]
    for e in group:
        if not e.ok:
            print(f"  {e.library:22s} {e.status}")
    t0 = time.perf_counter()
    for e in (e for e in group if e.ok):
        prepare(e, args.warmup, args.device, args.self_check)
        if e.ok:
            chosen = f", strategy {e.strategy}" if e.strategy else ""
            cold = f", cold first call {e.cold_s:.1f} s" if e.cold_s is not None else ""
            print(f"  {e.library:22s} {e.warmup_calls} warm-up/measured calls, "
                  f"<= {1e3 * e.estimate:.1f} ms/step{chosen}{cold}", flush=True)  # fmt: skip
    print(f"  (warm-up and measurements took {time.perf_counter() - t0:.1f} s)")

    # The baseline library, or (without it, e.g. outside the peers venv) eager torch.func.
    ok = {e.library: e for e in group if e.ok}
    reference = ok.get(baseline_name(name), ok.get("torch.func"))
    check_gradients(group, reference, workload, args.device)
    lines: list[str] = []
    logit_diffs: dict[str, float] = {}
    if not args.no_checks and (name == "conv4-maml-2nd" or workload.group == "m"):
        lines = check_float64(workload, args.f64_tasks, args.device)
    if not args.no_checks and workload.group == "c":
        lines, logit_diffs = check_protonet_logits(group[0].tasks, args.device)
    if lines:
        print("\n".join(lines), flush=True)

    live = [e for e in group if e.ok]
    t0 = time.perf_counter()
    for r in range(args.repeats):
        shift = r % max(len(live), 1)
        for e in live[shift:] + live[:shift]:  # rotate the order every round
            if not e.ok:
                continue
            try:
                e.times.append(time_round(e, args.min_run_time, threads, args.device))
                e.rounds.append(r)
            except Exception as exc:
                e.fail(exc)
    print(f"  timed {args.repeats} rounds in {time.perf_counter() - t0:.1f} s: " + ", ".join(
        f"{e.library} {1e3 * e.median:.2f} ms" for e in live if e.ok and e.times))  # fmt: skip
    for e in live:
        e.meta = None  # free the models and graphs of this workload
    return group, ([f"{name}:", *lines] if lines else []), logit_diffs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started, load_before = time.perf_counter(), os.getloadavg()
    print_environment(args.device, threads)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    n, peak_args = (256, {"min_run_time": 0.1, "rounds": 1}) if args.quick else (2048, {})
    peak_before = matmul_peak_flops(n, device=args.device, **peak_args)
    print(f"fp32 matmul peak (torch.mm {n}x{n} on {args.device}, best of medians): {peak_before / 1e9:.1f} GFLOP/s")

    entries: list[Entry] = []
    check_lines: list[str] = []
    logit_diffs: dict[str, float] = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in resolve_workloads(args.workloads):
        group, lines, diffs = run_workload(name, args, threads)
        entries += group
        check_lines += lines
        logit_diffs.update(diffs)
        # After every workload, so a run stopped by a time limit keeps what it measured.
        write_csv(args.out_dir / "meta.csv", rows_for_csv(entries, peak_before, threads, args.device))

    peak_after = matmul_peak_flops(n, device=args.device, **peak_args)
    peak = max(peak_before, peak_after)
    load_after = os.getloadavg()
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    title = (f"pymeta vs peers, meta-step tasks/s ({where}, {threads} thread(s), torch {torch.__version__}; "
             f"load {load_before[0]:.1f} -> {load_after[0]:.1f})")  # fmt: skip
    write_csv(args.out_dir / "meta.csv", rows_for_csv(entries, peak, threads, args.device))
    plot(entries, args.out_dir / "meta.png", title)

    print(f"\nfp32 matmul peak: {peak_before / 1e9:.1f} GFLOP/s before, "
          f"{peak_after / 1e9:.1f} after; using {peak / 1e9:.1f}")  # fmt: skip
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} CPUs)")
    print(f"total time {time.perf_counter() - started:.0f} s")
    strategies = [f"{e.workload}: {e.strategy}" for e in entries if e.library == "pymeta" and e.ok]
    if strategies:
        print("pymeta strategy chosen ('auto'): " + "; ".join(strategies))
    if check_lines:
        print("\nchecks:\n" + "\n".join(check_lines))
    print("\ntargets (measured vs goal):\n" + "\n".join(goal_lines(entries, logit_diffs, peak)))
    print_table(entries, peak, threads, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
