"""Fused inner-loop SGD (``pymeta.ops.inner_sgd``) against a per-tensor PyTorch loop.

For each fast-weight set (fast weights of T tasks, ``[T, *param.shape]`` per tensor) and
lr form, times ``[p - lr * g for p, g in ...]`` and ``inner_sgd`` on every backend that
runs here: the forward alone, and forward + backward (``autograd.grad`` of all outputs
w.r.t. params, grads and tensor rates, as in second-order MAML's meta-backward).

Sets: the sinusoid MLP 1-40-40-1 and the conv4 backbone (4 x [conv 3x3, 64 filters, 1
input channel first; BatchNorm weight and bias] + a 5-way linear head: 18 tensors, 112k
parameters per task) at T = 4, 32, 128. lr forms: a float (MAML) and per-element rates
(Meta-SGD). Medians of interleaved ``blocked_autorange`` runs on CPU (the machines are
noisy: read the ratios), ``triton.testing.do_bench`` on CUDA; also effective GB/s and
ATen ops dispatched per forward; on CUDA the GB/s as a share of the device's memory
bandwidth (``measure.memory_bandwidth``). Writes ``<out-dir>/inner_sgd_<device>_<n>threads.csv``
(``--out-dir``, default ``benchmarks/results``).

Allocation: by default glibc returns large freed blocks to the OS, so whether a variant's
outputs page-fault (about 1.4 us per 4 KiB page on these VMs: more than the arithmetic)
depends on the allocation history of the rounds before, not on the kernels. The script
therefore raises glibc's mmap and trim thresholds (``mallopt``) so freed blocks are reused
(as PyTorch's caching allocator always does on GPU); ``--os-malloc`` keeps glibc's defaults. On 2-core VMs shared with other processes,
``--threads 1 --cpu-time`` is the steadier measure (a preempted OpenMP thread stalls a
whole region, and wall time counts the time other processes ran).

    python benchmarks/bench_inner_sgd.py [--device cpu] [--threads N] [--cpu-time] [--os-malloc] [--repeats 5]
        [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from measure import RESULTS, bandwidth_columns, count_aten_ops, print_table, write_csv
from torch import Tensor
from torch.utils.benchmark import Timer

from pymeta.ops import force_backend, inner_sgd
from pymeta.ops._backends import BACKENDS, unavailable_reason


def mlp_shapes() -> list[tuple[int, ...]]:
    return [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


def conv4_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    channels = 1
    for _ in range(4):
        shapes += [(64, channels, 3, 3), (64,), (64,), (64,)]  # conv weight, bias, BN weight, bias
        channels = 64
    return [*shapes, (5, 64), (5,)]


SETS = {
    "mlp T=32": (mlp_shapes(), 32),
    "conv4 T=4": (conv4_shapes(), 4),
    "conv4 T=32": (conv4_shapes(), 32),
    "conv4 T=128": (conv4_shapes(), 128),
}


def per_tensor_loop(params: list[Tensor], grads: list[Tensor], lr: float | list[Tensor]) -> list[Tensor]:
    """What inner-loop code does without pymeta: two elementwise ops (and a temporary) per tensor."""
    if isinstance(lr, float):
        return [p - lr * g for p, g in zip(params, grads, strict=True)]
    return [p - r * g for p, g, r in zip(params, grads, lr, strict=True)]


def fused(backend: str) -> Callable[..., list[Tensor]]:
    def run(params: list[Tensor], grads: list[Tensor], lr: float | list[Tensor]) -> list[Tensor]:
        with force_backend(backend):
            return inner_sgd(params, grads, lr)

    return run


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float, cpu_time: bool) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0] / 1e3
    clock = time.process_time if cpu_time else time.perf_counter
    return Timer("fn()", globals={"fn": fn}, timer=clock).blocked_autorange(min_run_time=min_run_time).median


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap / trim thresholds so freed blocks stay in the heap; False if not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        # mmap threshold: glibc's maximum (32 MiB on 64-bit); trim: keep up to 2 GiB free.
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--min-run-time", type=float, default=0.3, help="seconds per blocked_autorange")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--os-malloc", action="store_true", help="keep glibc's defaults (outputs may page-fault)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock: immune to preemption, meaningful with --threads 1")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV goes (default: benchmarks/results)")
    args = ap.parse_args()
    malloc = "glibc defaults" if args.os_malloc or not reuse_freed_memory() else "freed blocks reused"
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    variants: dict[str, Callable[..., list[Tensor]]] = {"torch loop": per_tensor_loop}
    for backend in BACKENDS:
        reason = unavailable_reason(backend, device)
        if reason is None and not (backend == "triton" and device.type == "cpu"):
            variants[backend] = fused(backend)
        else:
            print(f"skipping backend {backend}: {reason or 'the Triton interpreter is not a benchmark'}")

    torch.manual_seed(0)
    cases = []  # (set, lr form, inputs)
    for set_name, (shapes, tasks) in SETS.items():
        params = [torch.randn(tasks, *s, device=device, requires_grad=True) for s in shapes]
        grads = [torch.randn(tasks, *s, device=device, requires_grad=True) for s in shapes]
        rates = [(torch.rand(s, device=device) * 0.1).requires_grad_() for s in shapes]
        cases += [(set_name, "float", (params, grads, 0.4)), (set_name, "per-element", (params, grads, rates))]

    timings: dict[tuple[str, str, str, str], list[float]] = {}
    jobs = []
    for set_name, form, (params, grads, lr) in cases:
        inputs = [*params, *grads, *([] if isinstance(lr, float) else lr)]
        grad_outs = [torch.randn_like(p) for p in params]
        expected = per_tensor_loop(params, grads, lr)
        for name, update in variants.items():
            got = update(params, grads, lr)
            err = max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True))
            assert err < 1e-5, f"{name} disagrees with the loop on {set_name} / {form}: {err:.2e}"

            def forward(update=update, params=params, grads=grads, lr=lr) -> object:
                with torch.no_grad():
                    return update(params, grads, lr)

            def forward_backward(update=update, params=params, grads=grads, lr=lr, inputs=inputs, go=grad_outs):
                return torch.autograd.grad(update(params, grads, lr), inputs, go)

            jobs += [((set_name, form, name, "fwd"), forward), ((set_name, form, name, "fwd+bwd"), forward_backward)]
    for _ in range(args.repeats):  # interleaved: machine noise hits every variant alike
        for key, fn in jobs:
            timings.setdefault(key, []).append(median_seconds(fn, device, args.min_run_time, args.cpu_time))

    rows = []
    for set_name, form, (params, grads, lr) in cases:
        # Minimal traffic of the forward: read p, g (and per-element rates once), write out.
        bytes_moved = sum(3 * p.numel() * p.element_size() for p in params)
        bytes_moved += 0 if isinstance(lr, float) else sum(r.numel() * r.element_size() for r in lr)
        loop_fwd = statistics.median(timings[(set_name, form, "torch loop", "fwd")])
        loop_bwd = statistics.median(timings[(set_name, form, "torch loop", "fwd+bwd")])
        for name, update in variants.items():
            fwd = statistics.median(timings[(set_name, form, name, "fwd")])
            bwd = statistics.median(timings[(set_name, form, name, "fwd+bwd")])
            with torch.no_grad():
                ops = count_aten_ops(lambda update=update, p=params, g=grads, lr=lr: update(p, g, lr)).total
            rows.append({
                "set": set_name, "lr": form, "variant": name, "elements": sum(p.numel() for p in params),
                "fwd_ms": 1e3 * fwd, "fwd_speedup": loop_fwd / fwd, "fwd_GBps": bytes_moved / fwd / 1e9,
                "fwd_bwd_ms": 1e3 * bwd, "fwd_bwd_speedup": loop_bwd / bwd, "aten_ops_fwd": ops,
            })
    tags = "_os_malloc" * args.os_malloc + "_cpu_time" * args.cpu_time
    bandwidth = bandwidth_columns(rows, device)
    write_csv(args.out_dir / f"inner_sgd_{device.type}_{torch.get_num_threads()}threads{tags}.csv", rows)
    clock = "CPU time" if args.cpu_time else "wall time"
    print(f"\ninner_sgd on {device} ({torch.get_num_threads()} threads, malloc: {malloc}, {clock}), medians of "
          f"{args.repeats} interleaved rounds; x loop = per-tensor loop time / variant time")
    print_table(rows, [
        ("set", "set", "12s"), ("lr", "lr", "11s"), ("variant", "variant", "10s"), ("elements", "elements", "9d"),
        ("fwd_ms", "fwd ms", "8.3f"), ("fwd_speedup", "x loop", "6.2f"), ("fwd_GBps", "GB/s", "6.2f"),
        *bandwidth, ("fwd_bwd_ms", "fwd+bwd ms", "10.3f"), ("fwd_bwd_speedup", "x loop", "6.2f"),
        ("aten_ops_fwd", "ATen ops", "8d"),
    ])

if __name__ == "__main__":
    main()
