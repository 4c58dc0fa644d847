"""ProtoNet head ops (``pymeta.ops.prototypes``, ``pymeta.ops.proto_logits``) per backend.

For each shape of the sweep and each variant, times the forward alone and forward +
backward (``autograd.grad`` w.r.t. the float inputs). Variants: ``torch``, the eager
PyTorch a user writes today with native autograd (``torch.cdist`` as easyfsl scores,
``normalize @ normalize.mT`` for cosine; one-hot ``bmm`` class means), then every pymeta
backend that runs here (``reference``, ``cpp`` on CPU; ``triton``, ``cuda`` on GPU). The
sweep includes the classic 5-way setting T=32, Q=75, N=5 at D=64 (conv4 embeddings) and
D=1600 (ResNet-12 / WRN embeddings).

CPU: medians of ``torch.utils.benchmark.Timer.blocked_autorange``, every variant timed in
each of ``--repeats`` interleaved rounds (the machines are noisy: read the ratios). CUDA:
``triton.testing.do_bench`` medians and effective GB/s of the forward's minimal traffic.
Also ATen ops dispatched per forward, all and non-view (a floor on kernel launches); the
reference is counted through its PyTorch ops, a fused op counts as one.
On CUDA also the GB/s as a share of the device's memory bandwidth
(``measure.memory_bandwidth``). Writes ``<out-dir>/proto_<device>_<n>threads[_cpu_time].csv``
(``--out-dir``, default ``benchmarks/results``) and prints a table last. On a loaded machine other processes preempt OpenMP threads in some rounds; the
1-thread run timed with the thread's CPU clock (``--threads 1 --cpu-time``) is immune to
that preemption and the steadier measure of the ops themselves.

    python benchmarks/bench_proto.py [--device cpu] [--threads N] [--cpu-time] [--repeats 3] [--min-run-time 0.3]
        [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics

import torch
import torch.nn.functional as F
from measure import (
    bandwidth_columns,
    count_aten_ops,
    median_seconds,
    op_benchmark_setup,
    print_table,
    write_csv,
)
from torch import Tensor

from pymeta.ops import force_backend, proto_logits, prototypes

logits_module = importlib.import_module("pymeta.ops.proto_logits")
protos_module = importlib.import_module("pymeta.ops.prototypes")

LOGITS_SHAPES = [(32, 75, 5, 64), (32, 75, 5, 1600), (4, 75, 5, 1600), (32, 75, 20, 64)]  # T, Q, N, D
PROTO_SHAPES = [(32, 5, 5, 64), (32, 5, 5, 1600), (32, 20, 5, 640)]  # T, N, K shots, D


def torch_logits(query: Tensor, protos: Tensor, metric: str) -> Tensor:
    """Eager PyTorch scores as peers write them (easyfsl: -torch.cdist)."""
    if metric == "cosine":
        return F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).mT
    dist = torch.cdist(query, protos)
    return -dist.square() if metric == "sqeuclidean" else -dist


def reference(op: str, *args: object) -> Tensor:
    """The op's pure-PyTorch reference on the public call's arguments."""
    if op == "proto_logits":
        query, protos, metric = args
        return logits_module.reference_forward(query, protos, logits_module.METRICS.index(metric), logits_module.EPS)
    return protos_module.reference_forward(*args)


def torch_prototypes(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    one_hot = F.one_hot(labels, n_way).to(support.dtype)
    return one_hot.mT @ support / one_hot.sum(1).unsqueeze(-1)


def backend_scope(variant: str) -> contextlib.AbstractContextManager:
    # The whole timed call runs in the scope: backward kernels pick their backend when the
    # backward runs, not when the forward recorded it.
    return contextlib.nullcontext() if variant == "torch" else force_backend(variant)


def main() -> None:
    args, device, backends = op_benchmark_setup(argparse.ArgumentParser(description=__doc__.splitlines()[0]), 0.3)

    torch.manual_seed(0)
    cases = []  # (op, shape label, metric, make_call(variant) -> (forward, forward+backward), bytes, inputs)
    for T, Q, N, D in LOGITS_SHAPES:
        query = torch.randn(T, Q, D, device=device, requires_grad=True)
        protos = torch.randn(T, N, D, device=device, requires_grad=True)
        grad = torch.randn(T, Q, N, device=device)
        for metric in logits_module.METRICS:
            variants = {"torch": torch_logits, **dict.fromkeys(backends, proto_logits)}
            cases.append(("proto_logits", f"T={T} Q={Q} N={N} D={D}", metric, variants,
                          (query, protos, metric), (query, protos), grad, 4 * (T * Q * D + T * N * D + T * Q * N)))
    for T, N, K, D in PROTO_SHAPES:
        support = torch.randn(T, N * K, D, device=device, requires_grad=True)
        labels = torch.stack([torch.randperm(N * K, device=device) % N for _ in range(T)])
        grad = torch.randn(T, N, D, device=device)
        variants = {"torch": torch_prototypes, **dict.fromkeys(backends, prototypes)}
        cases.append(("prototypes", f"T={T} N={N} K={K} D={D}", "-", variants,
                      (support, labels, N), (support,), grad, 4 * (T * N * K * D + T * N * D) + 8 * T * N * K))

    jobs = []
    for op, shape, metric, variants, call_args, inputs, grad, _ in cases:
        expected = variants["torch"](*call_args)
        for name, fn in variants.items():
            with backend_scope(name):
                err = (fn(*call_args) - expected).abs().max().item() / expected.abs().max().item()
            assert err < 1e-4, f"{name} disagrees with torch on {op} {shape} {metric}: {err:.2e}"

            def forward(fn=fn, name=name, call_args=call_args) -> object:
                with backend_scope(name), torch.no_grad():
                    return fn(*call_args)

            def forward_backward(fn=fn, name=name, call_args=call_args, inputs=inputs, grad=grad) -> object:
                with backend_scope(name):
                    return torch.autograd.grad(fn(*call_args), inputs, grad)

            jobs += [((op, shape, metric, name, "fwd"), forward), ((op, shape, metric, name, "fwd+bwd"), forward_backward)]
    timings: dict[tuple[str, ...], list[float]] = {}
    for _ in range(args.repeats):  # interleaved: machine noise hits every variant alike
        for key, fn in jobs:
            timings.setdefault(key, []).append(median_seconds(fn, device, args.min_run_time, args.cpu_time))

    rows = []
    for op, shape, metric, variants, call_args, _, _, bytes_moved in cases:
        med = {key[3:]: statistics.median(v) for key, v in timings.items() if key[:3] == (op, shape, metric)}
        for name, fn in variants.items():
            fwd, bwd = med[(name, "fwd")], med[(name, "fwd+bwd")]
            if name == "reference":  # count the reference's own PyTorch ops, not its custom-op wrapper
                ops = count_aten_ops(lambda op=op, a=call_args: reference(op, *(x.detach() if isinstance(x, Tensor) else x for x in a)))
            else:
                with backend_scope(name), torch.no_grad():
                    ops = count_aten_ops(lambda fn=fn, a=call_args: fn(*a))
            rows.append({
                "op": op, "shape": shape, "metric": metric, "variant": name,
                "fwd_us": 1e6 * fwd, "fwd_x_ref": med[("reference", "fwd")] / fwd, "fwd_x_torch": med[("torch", "fwd")] / fwd,
                "fwd_bwd_us": 1e6 * bwd, "fwd_bwd_x_ref": med[("reference", "fwd+bwd")] / bwd,
                "fwd_bwd_x_torch": med[("torch", "fwd+bwd")] / bwd, "fwd_GBps": bytes_moved / fwd / 1e9,
                "aten_ops_fwd": ops.total, "aten_non_view_ops_fwd": ops.non_view,
            })
    clock = "_cpu_time" if args.cpu_time else ""
    bandwidth = bandwidth_columns(rows, device)
    write_csv(args.out_dir / f"proto_{device.type}_{torch.get_num_threads()}threads{clock}.csv", rows)
    print(f"\nProtoNet head ops on {device} ({torch.get_num_threads()} threads{', thread CPU time' if args.cpu_time else ''}), "
          f"float32, medians of {args.repeats} interleaved rounds; x ref / x torch = that variant's time / this variant's time")
    print_table(rows, [
        ("op", "op", "12s"), ("shape", "shape", "22s"), ("metric", "metric", "11s"), ("variant", "variant", "9s"),
        ("fwd_us", "fwd us", "9.1f"), ("fwd_x_ref", "x ref", "6.2f"), ("fwd_x_torch", "x torch", "7.2f"),
        ("fwd_bwd_us", "fwd+bwd us", "10.1f"), ("fwd_bwd_x_ref", "x ref", "6.2f"),
        ("fwd_bwd_x_torch", "x torch", "7.2f"), ("fwd_GBps", "GB/s", "6.2f"), *bandwidth, ("aten_ops_fwd", "ops", "4d"),
    ])

if __name__ == "__main__":
    main()
