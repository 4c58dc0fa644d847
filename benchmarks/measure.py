"""Measurement helpers shared by the benchmark scripts (not part of the library).

One implementation of each, used by every script in ``benchmarks/``:

* :func:`count_aten_ops` -- ATen ops dispatched by one call (forward and backward), as an
  :class:`OpCount` ``(total, non_view, by_op)``.
* :func:`peak_memory` -- peak bytes of tensor storage alive at once during one call (on a
  CUDA device: the caching allocator's peak, ``torch.cuda.max_memory_allocated``).
* :func:`flops` -- FLOPs of one call (``FlopCounterMode``, grouped-conv backward fixed).
* :func:`measure_all` -- the three above, in two calls.
* :func:`count_kernel_launches` -- CUDA kernels launched by one call (``None`` on CPU).
* :func:`matmul_peak_flops` -- this machine's (or GPU's) achieved fp32 ``torch.mm`` rate,
  the yardstick for "fraction of peak".
* :func:`memory_bandwidth` -- a CUDA device's memory bandwidth, the yardstick for GB/s
  (:func:`bandwidth_columns` adds the achieved share to a table's rows).
* :func:`synchronize` -- wait for a CUDA device's queued work (a no-op on CPU).
* :func:`op_benchmark_setup`, :func:`median_seconds` -- the op microbenchmarks' common
  options and timer.
* :func:`write_csv` -- rows of dicts to ``benchmarks/results/<name>``.
"""

from __future__ import annotations

import argparse
import csv
import re
import time
import timeit
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.benchmark import Timer

__all__ = [
    "RESULTS",
    "OpCount",
    "StepMeasures",
    "bandwidth_columns",
    "count_aten_ops",
    "count_kernel_launches",
    "flops",
    "matmul_peak_flops",
    "measure_all",
    "median_seconds",
    "memory_bandwidth",
    "op_benchmark_setup",
    "peak_memory",
    "synchronize",
    "write_csv",
]

RESULTS = Path(__file__).resolve().parent / "results"


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a ``torch.device`` if it is a CUDA device, else None (CPU, or None)."""
    if device is None:
        return None
    device = torch.device(device)
    return device if device.type == "cuda" else None


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait until all work queued on ``device`` has finished, if it is a CUDA device.

    CUDA kernels run asynchronously: a ``perf_counter`` reading taken right after a call
    returns measures only the launches. No-op for CPU (and for ``None``).
    """
    cuda = _cuda_device(device)
    if cuda is not None:
        torch.cuda.synchronize(cuda)


# --------------------------------------------------------------------------------------
# Dispatched ATen ops
# --------------------------------------------------------------------------------------


class OpCount(NamedTuple):
    """Dispatched ATen ops of one call: all, non-view (a floor on kernel launches), per op.

    A custom op (e.g. ``pymeta::inner_sgd``) counts as one op, whatever its kernel runs
    internally: the dispatch mode sees the call, not the ops inside its implementation.
    """

    total: int
    non_view: int
    by_op: Counter[str]


class _OpCounter(TorchDispatchMode):
    """Counts every op reaching the Python dispatch key, and how many are views."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = func.overloadpacket.__name__
        namespace = getattr(func, "namespace", "aten")
        self.by_op[name if namespace == "aten" else f"{namespace}::{name}"] += 1
        if func.is_view:
            self.views += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], Any]) -> OpCount:
    """Count the ATen ops dispatched by one call of ``fn`` (forward *and* backward).

    A ``TorchDispatchMode`` sees every op that reaches the Python dispatch key: after
    autograd, after composite-implicit decompositions and after vmap's batching rules, i.e.
    the ops that actually run kernels (plus views and other metadata-only ops, reported
    separately via ``OpCount.non_view``). Custom ops are keyed ``namespace::name``.
    """
    counter = _OpCounter()
    with counter:
        fn()
    total = sum(counter.by_op.values())
    return OpCount(total, total - counter.views, counter.by_op)


# --------------------------------------------------------------------------------------
# Peak tensor memory
# --------------------------------------------------------------------------------------


def _storage_key(t: Tensor) -> int | None:
    """Identity of a tensor's storage (its StorageImpl address), or None if it has none."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


class _LiveStorageTracker(TorchDispatchMode):
    """Tracks bytes of tensor storages created by dispatched ops and still alive.

    A storage is new when it is an op output's storage that is not the storage of one of
    that op's tensor inputs (which rules out views and in-place/out= results) and is not
    already tracked. Its death is observed with ``weakref.finalize`` on the ``UntypedStorage``
    Python object, which PyTorch keeps alive exactly as long as the C++ storage
    (PyObject preservation), whatever views of it exist.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        """Finalizer of a tracked storage: it has been released."""
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse, some wrapper subclasses
                continue
            key = storage._cdata
            if key in self._tracked or key in inputs:
                continue
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes of tensor storage allocated by one call of ``fn`` and alive at once.

    On a CUDA ``device`` it is the caching allocator's reading instead (see
    :func:`_cuda_peak_memory`); otherwise (CPU, ``None``) the method below.

    Counts every storage created by an ATen op during the call (activations, saved tensors,
    gradients, the ``.grad`` fields it leaves behind) from its creation until it is freed;
    tensors that existed before the call (parameters, data) are the baseline and are not
    counted. Method: a ``TorchDispatchMode`` (see ``_LiveStorageTracker``) -- exact for
    tensor memory and deterministic, unlike allocator-level CPU readings. It does not see
    scratch buffers allocated *inside* a kernel (e.g. convolution workspaces, or the
    temporaries of a custom op's implementation), which no tensor outside it owns.
    ``torch.profiler(profile_memory=True)`` was rejected: on CPU it attributes allocations
    to op events and frees to ``[memory]`` events, so reconstructing a timeline needs its
    private ``_memory_profile`` API.
    """
    cuda = _cuda_device(device)
    if cuda is not None:
        return _cuda_peak_memory(fn, cuda)
    tracker = _LiveStorageTracker()
    with tracker:
        fn()
    return tracker.peak


def _cuda_peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak CUDA memory of one call of ``fn``: ``torch.cuda.max_memory_allocated`` during
    the call minus ``torch.cuda.memory_allocated`` before it.

    What the caching allocator handed out to tensors (block sizes rounded up to 512 bytes),
    *including* scratch buffers allocated inside kernels (cuDNN/cuBLAS workspaces) that the
    CPU method cannot see, and excluding memory the allocator caches but has not handed out.
    Memory that existed before the call and is freed during it (e.g. the previous
    ``.grad`` fields a meta-step drops first) lowers the reading: free those before the
    call for a figure comparable with the CPU one.
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
    **_: Any,
) -> int:
    """``aten.convolution_backward`` FLOPs, correct for grouped convolutions.

    ``FlopCounterMode``'s own formula (torch 2.13 and 2.14) ignores ``groups`` in the
    grad-weight term and so over-counts it ``groups``-fold. vmap over per-task conv
    weights runs grouped convolutions with ``groups = T``: uncorrected, the torch.func
    conv4 meta-step reads 10x the FLOPs of the per-task loops at T = 32.
    """
    from torch.utils.flop_counter import conv_flop_count

    def t(shape: Sequence[int]) -> list[int]:
        return [shape[1], shape[0], *shape[2:]]

    count = 0
    if output_mask[0]:
        count += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        if transposed:
            weight = conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1]))
        else:
            weight = conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1]))
        count += weight // groups
    return count


def flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmul/conv/attention ops only, by
    design; elementwise ops count zero), with grouped-conv backward corrected
    (:func:`_conv_backward_flop`).

    A ``torch.compile``'d ``fn`` runs eagerly here (``set_stance("force_eager")``; no
    effect on an eager ``fn``): under the counter's dispatch mode Dynamo traced pymeta's
    eager internals frame by frame, and compiled second-order conv4 MAML failed there (a
    second backward through donated buffers at 2 tasks, the recompile limit at 4)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(
        display=False,
        custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop},
    )
    with counter, torch.compiler.set_stance("force_eager"):
        fn()
    return int(counter.get_total_flops())


class StepMeasures(NamedTuple):
    """The hardware-independent figures of one call: ops, peak tensor bytes, FLOPs."""

    ops: OpCount
    peak_bytes: int
    flops: int


def measure_all(
    fn: Callable[[], Any], with_flops: bool = True, device: torch.device | str | None = None
) -> StepMeasures:
    """:func:`count_aten_ops`, :func:`peak_memory` and (unless ``with_flops=False``, then 0)
    :func:`flops` of ``fn``, in two calls instead of three.

    The op counter and the storage tracker are stacked in one call: each sees every op once
    and neither keeps a tensor, so the figures equal separate calls (checked by
    ``bench_meta.py --self-check``). ``FlopCounterMode`` is *not* stacked with them: its
    module tracker hooks module inputs and outputs (``register_multi_grad_hook``) and so
    changes tensor lifetimes -- measured here, the torch.func sinusoid 5-step meta-step
    read 10% more peak memory inside it.

    On a CUDA ``device`` the peak is the allocator's (:func:`_cuda_peak_memory`), read
    around the op-counting call: the op counter keeps no tensor, so it changes no
    allocation.
    """
    op_counter = _OpCounter()
    cuda = _cuda_device(device)
    if cuda is not None:
        peak = _cuda_peak_memory(lambda: _run_in(op_counter, fn), cuda)
    else:
        tracker = _LiveStorageTracker()
        with op_counter, tracker:
            fn()
        peak = tracker.peak
    total = sum(op_counter.by_op.values())
    ops = OpCount(total, total - op_counter.views, op_counter.by_op)
    return StepMeasures(ops, peak, flops(fn) if with_flops else 0)


def _run_in(mode: TorchDispatchMode, fn: Callable[[], Any]) -> None:
    """Call ``fn`` inside the dispatch mode ``mode``."""
    with mode:
        fn()


# --------------------------------------------------------------------------------------
# CUDA kernel launches
# --------------------------------------------------------------------------------------


def count_kernel_launches(
    fn: Callable[[], Any], device: torch.device | str | None = "cuda"
) -> int | None:
    """CUDA kernels launched by one call of ``fn`` (forward and backward), or ``None`` when
    there is nothing to count: ``device`` is not a CUDA device (CPU) or no CUDA device is
    visible to torch.

    Method: ``torch.profiler.profile(activities=[CPU, CUDA])`` around the call (followed
    by ``torch.cuda.synchronize()`` so every launched kernel has run and been recorded),
    then the device-side events whose Kineto activity type is ``"kernel"`` (CUPTI's
    concurrent-kernel records): one per kernel execution on the GPU, whoever launched it
    (ATen, cuBLAS/cuDNN internals, Triton, a custom op). *Not* counted: memory copies
    (``"gpu_memcpy"``, e.g. ``.item()`` or host-to-device transfers) and memsets
    (``"gpu_memset"``, e.g. ``zeros``/``cudaMemsetAsync``), host-side runtime calls
    (``cudaLaunchKernel`` is a ``"cuda_runtime"`` event) and GPU annotations. It is the
    figure that :attr:`OpCount.non_view` bounds from below on CPU; per-kernel launch
    overhead (~5-10 us) is what dominates small meta-learning steps on a GPU.
    """
    cuda = _cuda_device(device)
    if cuda is None or not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(cuda)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(cuda)
    events = prof.profiler.kineto_results.events()
    return sum(
        1 for e in events if e.device_type() == DeviceType.CUDA and e.activity_type() == "kernel"
    )


def matmul_peak_flops(
    n: int = 2048,
    min_run_time: float = 0.5,
    rounds: int = 3,
    device: torch.device | str | None = None,
) -> float:
    """This machine's fp32 matmul rate in FLOP/s: the best of ``rounds`` medians of a
    ``torch.mm`` of two ``n x n`` matrices (``2 n^3`` FLOPs), on the current torch threads,
    or on ``device`` (a GPU's rate for a CUDA device; ``Timer`` synchronizes CUDA).

    "Best of" because it stands for the peak: noise from other processes only lowers it.
    """
    from torch.utils.benchmark import Timer

    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, n, generator=g).to(device or "cpu")
    b = torch.rand(n, n, generator=g).to(device or "cpu")
    timer = Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                  num_threads=torch.get_num_threads())  # fmt: skip
    timer.timeit(1)  # warm-up (packing buffers, thread pool)
    best = min(timer.blocked_autorange(min_run_time=min_run_time).median for _ in range(rounds))
    return 2.0 * n**3 / best


def memory_bandwidth(device: torch.device | str, nbytes: int = 256 << 20) -> tuple[float, str]:
    """A CUDA device's memory bandwidth in bytes/s, the yardstick for achieved GB/s, and a
    line saying where it comes from.

    The DRAM spec from the device properties: memory clock x bus width x 2 transfers per
    clock (double data rate; e.g. A100 40 GB: 1215 MHz x 5120 bit x 2 = 1555 GB/s), or,
    where the properties report no memory clock, what a device-to-device copy of
    ``nbytes`` reaches (read + write, median of 10 copies timed with CUDA events). The
    copy rate is measured either way and given in the line, as the practical ceiling.
    """
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    copy = 2 * nbytes / sorted(seconds)[len(seconds) // 2]
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    measured = f"a {nbytes >> 20} MiB device-to-device copy reaches {copy / 1e9:.0f} GB/s"
    if not (clock_khz and bus_bits):
        return copy, f"{measured} (the device properties give no memory clock)"
    spec = 2 * clock_khz * 1e3 * bus_bits / 8
    return spec, f"spec {clock_khz / 1e3:.0f} MHz x {bus_bits} bit x 2; {measured}"


def bandwidth_columns(rows: Sequence[dict[str, Any]], device: torch.device) -> list[tuple[str, str, str]]:
    """On a CUDA ``device``: add to each row (which has ``fwd_GBps``) the device's memory
    bandwidth (:func:`memory_bandwidth`, printed with its source) and the achieved share of
    it, and return that share's :func:`print_table` column; on CPU, nothing."""
    if device.type != "cuda":
        return []
    bandwidth, source = memory_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)} memory bandwidth: {bandwidth / 1e9:.0f} GB/s ({source})")
    for row in rows:
        row["bandwidth_GBps"] = bandwidth / 1e9
        row["fwd_pct_of_bandwidth"] = 100 * row["fwd_GBps"] * 1e9 / bandwidth
    return [("fwd_pct_of_bandwidth", "%bw", "5.1f")]


# --------------------------------------------------------------------------------------
# Op microbenchmarks: common options and timing
# --------------------------------------------------------------------------------------


def op_benchmark_setup(
    ap: argparse.ArgumentParser, min_run_time: float
) -> tuple[argparse.Namespace, torch.device, list[str]]:
    """Add the options every op microbenchmark takes (``--device --threads --cpu-time
    --repeats --min-run-time --out-dir``) to ``ap``, parse, apply ``--threads``; return the
    arguments, the device and the pymeta backends to time there (the Triton interpreter is
    no benchmark), saying why each other backend is skipped."""
    from pymeta.ops._backends import BACKENDS, unavailable_reason

    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the calling thread's CPU clock (CPU only; needs --threads 1)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--min-run-time", type=float, default=min_run_time, help="seconds per blocked_autorange")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV goes (default: benchmarks/results)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_time and (device.type != "cpu" or torch.get_num_threads() != 1):
        ap.error("--cpu-time measures the calling thread only: use it with --device cpu --threads 1")
    backends = []
    for backend in BACKENDS:
        reason = unavailable_reason(backend, device)
        if reason is None and not (backend == "triton" and device.type == "cpu"):
            backends.append(backend)
        else:
            print(f"skipping backend {backend}: {reason or 'the Triton interpreter is not a benchmark'}")
    return args, device, backends


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float, cpu_time: bool) -> float:
    """Median seconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, else
    ``Timer.blocked_autorange`` with torch's thread count (and the thread's CPU clock if
    ``cpu_time``)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0] / 1e3
    clock = time.thread_time if cpu_time else timeit.default_timer
    # Timer runs its statement with num_threads intra-op threads (default 1), not torch's setting.
    timer = Timer("fn()", globals={"fn": fn}, timer=clock, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], rule: bool = True) -> None:
    """Print ``rows`` as a fixed-width table: ``columns`` are ``(key, header, format spec)``,
    e.g. ``("fwd_ms", "fwd ms", "8.3f")``; text columns (spec ending in ``s``) align left,
    numbers right, each header padded to the spec's width. ``rule``: a dashed line under
    the header."""
    def head(title: str, spec: str) -> str:
        width = re.match(r"\d*", spec).group()
        return f"{title:{'' if spec.endswith('s') else '>'}{width}s}"

    header = " ".join(head(title, spec) for _, title, spec in columns)
    print(header)
    if rule:
        print("-" * len(header))
    for r in rows:
        print(" ".join(f"{r[key]:{spec}}" for key, _, spec in columns))


def write_csv(name: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as CSV to ``benchmarks/results/<name>`` (or to ``name`` if it is a path
    with a folder); the columns are the union of the rows' keys, in first-seen order."""
    path = Path(name)
    if path.parent == Path("."):
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    fieldnames: dict[str, None] = {}
    for row in rows:
        fieldnames.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
