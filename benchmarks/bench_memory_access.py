"""MANN's memory step: the fused op ``pymeta.ops.memory_access`` vs the composite PyTorch step.

Two levels, every variant timed in each of ``--repeats`` interleaved rounds (CPU: medians
of ``torch.utils.benchmark.Timer.blocked_autorange``; the machines are noisy: read the
ratios):

* ``op``: one memory step for T tasks (128 x 40 memory, 4 heads), forward and forward +
  backward: ``composite`` (the PyTorch ops with autograd through each, what a user writes)
  and every backend of the fused op that runs here (``reference``: the same PyTorch ops
  inside the custom op with a hand-written backward; ``cpp`` on CPU; ``triton`` and
  ``cuda`` on GPU).
* ``step``: a MANN training step (forward and backward over a batch of T Glyphs
  sequences, 5 classes x 10 instances = 50 steps, 784 inputs, controller 200, memory
  128 x 40, 4 heads) with the fused op (``fused``, automatic backend) and with the
  composite step (``composite``), and the LSTM baseline (``lstm``, no memory) for scale.

Beside the times: ATen ops dispatched per call (a fused op counts as one; a floor on
kernel launches). On a loaded machine other processes preempt OpenMP threads; ``--threads
1 --cpu-time`` times with the thread's CPU clock, immune to that. Writes
``<out-dir>/memory_access_<device>_<n>threads[_cpu_time].csv``, prints a table last.

    python benchmarks/bench_memory_access.py [--tasks 16] [--threads N] [--cpu-time] [--repeats 3] [--min-run-time 1]
                                             [--device cpu] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from measure import (
    count_aten_ops,
    median_seconds,
    op_benchmark_setup,
    print_table,
    synchronize,
    write_csv,
)

import pymeta
from pymeta.data import Glyphs, SequenceSampler
from pymeta.ops import force_backend, memory_access
from pymeta.ops._backends import BACKENDS
from pymeta.ops.memory_access import composite

R, W, H = 128, 40, 4  # the paper's memory


def scope(backend: str | None) -> contextlib.AbstractContextManager:
    # The whole call runs in the scope: the backward picks its backend when it runs.
    return contextlib.nullcontext() if backend is None else force_backend(backend)


def op_jobs(T: int, device: torch.device, backends: list[str]) -> dict[tuple[str, str, str], Callable[[], object]]:
    """``{("op", variant, "fwd" | "fwd+bwd"): call}`` for one memory step of T tasks."""
    torch.manual_seed(0)
    inputs = [0.1 * torch.randn(T, R, W), torch.rand(T, R), torch.softmax(torch.randn(T, H, R), -1),
              torch.tanh(torch.randn(T, H, W)), torch.tanh(torch.randn(T, H, W)), torch.rand(T, H)]
    inputs = [x.to(device).requires_grad_() for x in inputs]
    variants = {"composite": (composite, None), **{b: (memory_access, b) for b in backends}}
    jobs = {}
    for name, (fn, backend) in variants.items():
        def forward(fn=fn, backend=backend) -> object:
            with scope(backend), torch.no_grad():
                return fn(*inputs, 0.95)

        def forward_backward(fn=fn, backend=backend) -> object:
            with scope(backend):
                out = fn(*inputs, 0.95)
                return torch.autograd.grad([o.sum() for o in out], inputs)

        jobs[("op", name, "fwd")], jobs[("op", name, "fwd+bwd")] = forward, forward_backward
    return jobs


def step_jobs(T: int, device: torch.device) -> dict[tuple[str, str, str], Callable[[], object]]:
    """``{("step", variant, "fwd+bwd"): call}``: one MANN training step without the optimizer."""
    batch = SequenceSampler(Glyphs("train"), n_way=5, instances=10, meta_batch=T, seed=0).sample().to(device)
    torch.manual_seed(0)
    models = {"fused": pymeta.MANN(784, 5), "composite": pymeta.MANN(784, 5, fused=False),
              "lstm": pymeta.MANN(784, 5, memory_rows=0)}
    models["composite"].load_state_dict(models["fused"].state_dict())
    jobs = {}
    for name, mann in models.items():
        mann.to(device)

        def step(mann=mann) -> object:
            mann.zero_grad(set_to_none=True)
            loss = mann.train_step(batch, F.cross_entropy)
            synchronize(device)
            return loss

        jobs[("step", name, "fwd+bwd")] = step
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[16], help="T, sequences per meta-batch")
    args, device, backends = op_benchmark_setup(ap, min_run_time=1.0)

    jobs = {(T, *key): fn for T in args.tasks for key, fn in {**op_jobs(T, device, backends),
                                                               **step_jobs(T, device)}.items()}
    for key, fn in jobs.items():  # warm-up: extension build, first-call costs
        print("warm-up", *key, flush=True)
        fn()
    timings: dict[tuple, list[float]] = {}
    for round_ in range(args.repeats):  # interleaved: machine noise hits every variant alike
        print(f"round {round_ + 1} of {args.repeats}", flush=True)
        for key, fn in jobs.items():
            timings.setdefault(key, []).append(median_seconds(fn, device, args.min_run_time, args.cpu_time))

    rows = []
    for (T, level, variant, what), times in timings.items():
        base = statistics.median(timings[(T, level, "composite", what)])
        with scope(variant if variant in BACKENDS else None):
            ops = count_aten_ops(jobs[(T, level, variant, what)])
        rows.append({"T": T, "level": level, "variant": variant, "measure": what,
                     "ms": 1e3 * statistics.median(times), "x_composite": base / statistics.median(times),
                     "aten_ops": ops.total, "non_view_ops": ops.non_view})
    clock = "_cpu_time" if args.cpu_time else ""
    write_csv(args.out_dir / f"memory_access_{device.type}_{torch.get_num_threads()}threads{clock}.csv", rows)
    print(f"\nMANN memory step on {device} ({torch.get_num_threads()} threads"
          f"{', thread CPU time' if args.cpu_time else ''}), float32, memory {R} x {W}, {H} heads; medians of "
          f"{args.repeats} interleaved rounds; x composite = the composite step's time / this variant's")
    print_table(rows, [("T", "T", "3d"), ("level", "level", "6s"), ("variant", "variant", "10s"),
                       ("measure", "measure", "8s"), ("ms", "ms", "9.2f"), ("x_composite", "x comp", "7.2f"),
                       ("aten_ops", "ATen ops", "9d"), ("non_view_ops", "non-view", "9d")])


if __name__ == "__main__":
    main()
