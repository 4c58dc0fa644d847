"""Max-pool forward on CPU (``pymeta.ops.max_pool2d``) per path, and its share of a conv4 step.

Part 1, the forward with indices (what autograd needs) on conv4 activation shapes,
2x2 / stride 2, three ways: ATen's NCHW kernel, ATen's channels-last kernel with the
layout round trip (input to channels-last, output and indices back), and pymeta's C++
kernel on the NCHW planes in place (``pymeta_cpu::max_pool2d``). Medians
of ``--repeats`` interleaved rounds of ``--calls`` calls each.

Part 1b, the same three ways for adaptive max pooling (``pymeta.ops.adaptive_max_pool2d``,
``pymeta_cpu::adaptive_max_pool2d``) on a Relation Network module's shapes: one task's 75
queries x 5 classes of 64 x 7 x 7 pair maps to 5 x 5, then 3 x 3 maps to 1 x 1.

Part 2, an A/B of the whole conv4 second-order MAML meta-step (workload (b) of
``bench_meta.py``, pymeta ``lowered``, ``task_chunk=1``) with the C++ kernel enabled and
disabled (``CPP_MIN_WIDTH`` raised out of reach), alternating in one process: the
median of the per-round time ratios.

    python benchmarks/bench_max_pool2d.py [--threads 1] [--repeats 7] [--calls 20] [--steps 6] [--out-dir DIR]

The kernel is pymeta's CPU path: with ``--device cuda`` (as ``pymeta bench ops --device
cuda`` passes it) the script says so and measures nothing.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from measure import RESULTS, print_table, write_csv
from runner import build_step
from workloads import WORKLOADS

from pymeta._malloc import keep_freed_memory
from pymeta.ops._backends import unavailable_reason

# The module, not the function pymeta.ops re-exports under the same name (which
# ``import pymeta.ops.max_pool2d as ...`` would bind).
max_pool2d_module = importlib.import_module("pymeta.ops.max_pool2d")

SHAPES = [(75, 64, 28, 28), (5, 64, 28, 28), (75, 64, 14, 14), (75, 64, 7, 7)]  # conv4 query / support planes
WINDOW = ([2, 2], [2, 2])
ADAPTIVE = [((375, 64, 7, 7), [5, 5]), ((375, 64, 3, 3), [1, 1])]  # RelationNet module: (input, output_size)


def aten_nchw(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, *WINDOW, [0, 0], [1, 1], False)


def aten_channels_last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, indices = torch.ops.aten.max_pool2d_with_indices(
        x.contiguous(memory_format=torch.channels_last), *WINDOW, [0, 0], [1, 1], False
    )
    return out.contiguous(), indices.contiguous()


def pymeta_cpp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.pymeta_cpu.max_pool2d(x, *WINDOW)


def interleaved_medians(
    fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int, calls: int
) -> dict[str, float]:
    """Median seconds per call ``fn(x)`` of each function, timed in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def kernel_rows(repeats: int, calls: int) -> list[dict[str, object]]:
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape)
        assert torch.equal(pymeta_cpp(x)[1], aten_nchw(x)[1])  # same argmax before timing
        med = interleaved_medians({"nchw": aten_nchw, "cl": aten_channels_last, "cpp": pymeta_cpp}, x, repeats, calls)
        rows.append({"shape": str(list(shape)), "aten_nchw_ms": 1e3 * med["nchw"],
                     "aten_cl_round_trip_ms": 1e3 * med["cl"], "pymeta_cpp_ms": 1e3 * med["cpp"],
                     "cl_over_cpp": med["cl"] / med["cpp"],
                     "used": "cpp" if shape[-1] >= max_pool2d_module.CPP_MIN_WIDTH else "cl"})  # fmt: skip
    return rows


def adaptive_rows(repeats: int, calls: int) -> list[dict[str, object]]:
    rows = []
    for shape, size in ADAPTIVE:
        x = torch.randn(shape)
        fns = {
            "nchw": lambda x, size=size: torch.ops.aten.adaptive_max_pool2d(x, size),
            "cl": lambda x, size=size: [t.contiguous() for t in torch.ops.aten.adaptive_max_pool2d(
                x.contiguous(memory_format=torch.channels_last), size)],
            "cpp": lambda x, size=size: torch.ops.pymeta_cpu.adaptive_max_pool2d(x, size),
        }
        assert torch.equal(fns["cpp"](x)[1].long(), fns["nchw"](x)[1])  # same argmax before timing
        med = interleaved_medians(fns, x, repeats, calls)
        rows.append({"shape": f"{list(shape)} -> {size}", "aten_nchw_ms": 1e3 * med["nchw"],
                     "aten_cl_round_trip_ms": 1e3 * med["cl"], "pymeta_cpp_ms": 1e3 * med["cpp"],
                     "cl_over_cpp": med["cl"] / med["cpp"], "nchw_over_cpp": med["nchw"] / med["cpp"]})
    return rows


def meta_step_ab(
    steps: int, module: Any, attribute: str, workload: str = "conv4-maml-2nd", off: int = 10**9
) -> dict[str, float]:
    """Median meta-step seconds of ``workload`` (pymeta, lowered) with a fast path on
    (``module.attribute``, the bound that enables it, as it is) and off (set to ``off``:
    by default a minimum plane width out of reach), alternating in one process, and the
    median per-round ratio off / on."""
    meta = build_step(WORKLOADS[workload], "pymeta[lowered]")
    default_width = getattr(module, attribute)
    for _ in range(2):
        meta.step()
    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for _ in range(steps):
            for name, width in (("on", default_width), ("off", off)):
                setattr(module, attribute, width)
                start = time.perf_counter()
                meta.step()
                times[name].append(time.perf_counter() - start)
    finally:
        setattr(module, attribute, default_width)
    ratio = statistics.median(off / on for off, on in zip(times["off"], times["on"], strict=True))
    return {"on_s": statistics.median(times["on"]), "off_s": statistics.median(times["off"]), "off_over_on": ratio}


def cpu_kernel_args(doc: str, script: str, calls: int, steps: int) -> argparse.Namespace | None:
    """The command line of a CPU-kernel benchmark (this one, bench_batch_norm_relu_pool.py),
    with the thread count set; None (after saying so) on a device with nothing to measure.
    Exits when the C++ extension is not available."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (part 1)")
    p.add_argument("--calls", type=int, default=calls, help="calls per round and variant (part 1)")
    p.add_argument("--steps", type=int, default=steps, help="meta-steps per variant (part 2; 0 skips it)")
    p.add_argument("--device", default="cpu", help="cpu; on any other device there is nothing to measure")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV goes (default: benchmarks/results)")
    args = p.parse_args()
    if torch.device(args.device).type != "cpu":
        print(f"{script}: the kernel is pymeta's CPU path; nothing to measure on {args.device}")
        return None
    reason = unavailable_reason("cpp", torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"error: the C++ extension is not available: {reason}")
    torch.set_num_threads(args.threads)
    # Kernels timed with the allocator setting pymeta's learners run with: glibc's defaults
    # fault a fresh 15 MB output in at every call (ATen's first conv4 layer: 21 ms, not 4).
    keep_freed_memory()
    return args


def main() -> None:
    args = cpu_kernel_args(__doc__, "bench_max_pool2d", calls=20, steps=6)
    if args is None:
        return
    rows = kernel_rows(args.repeats, args.calls)
    write_csv(args.out_dir / f"max_pool2d_{args.threads}threads.csv", rows)
    print(f"\nmax_pool2d_with_indices forward, 2x2/2, {args.threads} thread(s), median of {args.repeats} rounds; "
          f"'used' = what pymeta.ops.max_pool2d runs for that shape")  # fmt: skip
    print_table(rows, [("shape", "shape", "18s"), ("aten_nchw_ms", "ATen NCHW ms", "12.3f"),
                       ("aten_cl_round_trip_ms", "ATen CL+copies ms", "17.3f"),
                       ("pymeta_cpp_ms", "pymeta C++ ms", "13.3f"), ("cl_over_cpp", "CL/C++", "7.2f"),
                       ("used", "used", "4s")])  # fmt: skip
    adaptive = adaptive_rows(args.repeats, args.calls)
    write_csv(args.out_dir / f"adaptive_max_pool2d_{args.threads}threads.csv", adaptive)
    print(f"\nadaptive_max_pool2d forward, {args.threads} thread(s), median of {args.repeats} rounds")
    print_table(adaptive, [("shape", "shape", "30s"), ("aten_nchw_ms", "ATen NCHW ms", "12.3f"),
                           ("aten_cl_round_trip_ms", "ATen CL+copies ms", "17.3f"),
                           ("pymeta_cpp_ms", "pymeta C++ ms", "13.3f"), ("nchw_over_cpp", "NCHW/C++", "8.2f"),
                           ("cl_over_cpp", "CL/C++", "7.2f")])  # fmt: skip
    if args.steps:
        ab = meta_step_ab(args.steps, max_pool2d_module, "CPP_MIN_WIDTH")
        print(f"\nconv4 2nd-order MAML meta-step (32 tasks, lowered, task_chunk=1), {args.steps} alternating rounds: "
              f"C++ forward {ab['on_s']:.3f} s, channels-last round trip {ab['off_s']:.3f} s, "
              f"ratio {ab['off_over_on']:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()
