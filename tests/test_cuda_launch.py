"""Host side of the CUDA launchers, checked without a GPU: entry tables and grids.

The CUDA kernels only run on a GPU, but what their launchers compute before a launch -
the packed entry tables of ``inner_sgd`` and every kernel's grid - is plain C++ in
``csrc/*_launch.h``. tests/cuda_launch.cpp compiles those headers for the CPU and prints
what they compute; this file checks it against what the kernels in ``csrc/*.cuh`` do
with it, mirrored here: which block reads which table entry and which elements, columns
and partial-sum slots it then touches (each exactly once), and CUDA's launch limits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_GRID_X, MAX_GRID_Y, MAX_THREADS, WARP = 2**31 - 1, 65535, 1024, 32


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """``host(*commands)``: the JSON answers of tests/cuda_launch.cpp, built with the C++ compiler."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (CXX, c++ or g++): the CUDA launch arithmetic is not checked")
    exe = tmp_path_factory.mktemp("cuda_launch") / "cuda_launch"
    cmd = [compiler, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "cuda_launch.cpp"), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stderr[-4000:]}"

    def run(*commands: str) -> list[dict]:
        done = subprocess.run([str(exe)], input="\n".join(commands) + "\n", capture_output=True, text=True,
                              timeout=60, check=True)
        return [json.loads(line) for line in done.stdout.splitlines()]

    return run


def assert_valid(launch: list[int], threads: int | None = None) -> None:
    """Within CUDA's limits, and with the block size the kernel's indexing assumes."""
    x, y, block = launch
    assert 1 <= x <= MAX_GRID_X and 1 <= y <= MAX_GRID_Y, launch
    assert block <= MAX_THREADS and block % WARP == 0, launch
    if threads is not None:
        assert block == threads, f"the kernel indexes with {threads} threads per block, launched with {block}"


def owners(first_tiles: list[int], blocks: int) -> np.ndarray:
    """find_entry of inner_sgd.cuh for every block: the last entry whose first_tile <= block."""
    assert first_tiles == sorted(first_tiles) and first_tiles[0] == 0, "binary search needs sorted first tiles"
    return np.searchsorted(np.asarray(first_tiles), np.arange(blocks), side="right") - 1


def assert_tiles_cover(name: str, owner: np.ndarray, first_tiles: list[int], sizes: list[int], tile: int) -> None:
    """Block b works on [(b - first_tile) * tile, + tile) of its entry: every index of every
    entry in exactly one block, and no block past its entry's end."""
    start = (np.arange(len(owner)) - np.asarray(first_tiles)[owner]) * tile
    for k, size in enumerate(sizes):
        mine = np.sort(start[owner == k])
        np.testing.assert_array_equal(mine, np.arange(0, size, tile), err_msg=f"{name}: entry {k} of size {size}")


# (rows, cols, p_rs, g_rs, lr_rs, lr_cs) per tensor, as csrc/inner_sgd.h derives them.
def conv4_shapes(T: int, lr: str) -> list[tuple[int, ...]]:
    """The conv4 backbone's 18 fast-weight tensors at T tasks (p: MAML's stride-0 expand)."""
    sizes, channels = [], 1
    for _ in range(4):
        sizes += [64 * channels * 9, 64, 64, 64]
        channels = 64
    sizes += [5 * 64, 5]
    rates = {"none": (0, 0), "element": (0, 1), "task": (1, 0), "task_element": (None, 1), "layer": (0, 0)}[lr]
    return [(T, c, 0, c, c if rates[0] is None else rates[0], rates[1]) for c in sizes]


SETS = {
    "mlp float lr": ([(25, 40, 40, 40, 0, 0), (25, 40, 40, 40, 0, 0), (25, 1600, 0, 1600, 0, 0), (1, 1, 1, 1, 0, 0)],
                     False),
    **{f"conv4 T=32 {lr} lr": (conv4_shapes(32, lr), lr != "none")
       for lr in ("none", "element", "task", "task_element", "layer")},
    "long rows, strided": ([(3, 70000, 140000, 70000, 0, 1), (7, 1, 2, 1, 1, 0)], True),
}


def _shape_args(shapes: list[tuple[int, ...]]) -> str:
    return f"{len(shapes)} " + " ".join(" ".join(map(str, s)) for s in shapes)


def test_entry_tables_are_packed_arrays_of_8_byte_fields(host):
    """The launchers memcpy the tables to the device, the kernels index them as struct
    arrays: fields in declaration order, 8 bytes each, no padding (also static_asserts)."""
    (layout,) = host("layout")
    for name in ("Shape", "ForwardEntry", "BackwardEntry", "ReduceEntry"):
        struct = layout[name]
        ends = [0] + [offset + size for _, offset, size in struct["fields"]]
        assert [offset for _, offset, _ in struct["fields"]] == ends[:-1], f"{name}: padding between fields"
        assert all(size % 8 == 0 for *_, size in struct["fields"]) and struct["size"] == ends[-1], name
        assert struct["align"] == 8, name
    assert [size for field, _, size in layout["ForwardEntry"]["fields"] if field == "shape"] == [layout["Shape"]["size"]]
    constants = layout["constants"]
    assert constants["kForwardTile"] % constants["kForwardThreads"] == 0
    assert constants["kBackwardThreads"] % WARP == 0 and constants["kBackwardThreads"] // WARP <= WARP  # block_sum


@pytest.mark.parametrize("name", list(SETS))
def test_inner_sgd_forward_table_and_grid(host, name):
    shapes, has_lr = SETS[name]
    (layout, plan) = host("layout", f"inner_sgd_forward {int(has_lr)} {_shape_args(shapes)}")
    threads, tile = layout["constants"]["kForwardThreads"], layout["constants"]["kForwardTile"]
    table = plan["table"]
    for k, (entry, shape) in enumerate(zip(table, shapes, strict=True)):
        p, g, out, lr, *geometry, _ = entry
        assert (p, g, out) == (16 * (k + 1), 16 * (k + 1) + 1, 16 * (k + 1) + 2), f"pointers of entry {k} misplaced"
        assert lr == (16 * (k + 1) + 3 if has_lr else 0)
        assert tuple(geometry) == shape, f"entry {k}: (rows, cols, strides) {geometry} for {shape}"
    blocks = plan["launch"][0]
    assert_valid(plan["launch"], threads)
    first_tiles = [e[-1] for e in table]
    assert_tiles_cover(name, owners(first_tiles, blocks), first_tiles, [s[0] * s[1] for s in shapes], tile)


@pytest.mark.parametrize("need_grads,need_lr", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("name", list(SETS))
def test_inner_sgd_backward_tables_and_grids(host, name, need_grads, need_lr):
    shapes, has_lr = SETS[name]
    need_lr = need_lr and has_lr
    (layout, plan) = host("layout", f"inner_sgd_backward {int(need_grads)} {int(need_lr)} {int(has_lr)} "
                                    f"{_shape_args(shapes)}")
    threads = layout["constants"]["kBackwardThreads"]
    table, reduce = plan["table"], plan["reduce"]
    assert_valid(plan["launch"], threads)
    first_tiles = [e[-1] for e in table]
    assert_tiles_cover(name, owners(first_tiles, plan["launch"][0]), first_tiles, [s[1] for s in shapes], threads)

    slots = np.zeros(plan["partials"], dtype=np.int64)  # how often each partial-sum slot is written
    reduced = iter(reduce)
    for k, (entry, shape) in enumerate(zip(table, shapes, strict=True)):
        go, g, lr, grad_g, grad_lr, *geometry, partial, _ = entry
        base = 16 * (k + 1)
        assert (go, g, lr, grad_g, grad_lr) == (base, base + 1 if need_lr else 0, base + 2 if has_lr else 0,
                                                base + 3 if need_grads else 0, base + 4 if need_lr else 0)
        assert tuple(geometry) == shape
        rows, cols, *_, lr_rs, lr_cs = shape
        strips = -(-cols // threads)
        if not (need_lr and lr_cs == 0):  # no lr gradient, or one per element: no partial sums
            assert partial == -1
            continue
        # backward_kernel: strip s, row t writes partials[partial + s * rows + t]; reduce_kernel
        # adds the entry's strips (tiles) per row into grad_lr[t] (per task) or grad_lr[0].
        np.add.at(slots, partial + np.arange(strips)[:, None] * rows + np.arange(rows)[None, :], 1)
        assert next(reduced) == [grad_lr, partial, rows, strips, int(lr_rs != 0)], f"reduce entry of entry {k}"
    assert next(reduced, None) is None, "a reduce entry without its table entry"
    assert (slots == 1).all(), "every partial-sum slot is written exactly once"
    if reduce:
        assert_valid(plan["reduce_launch"], layout["constants"]["kReduceThreads"])
        assert plan["reduce_launch"][0] == len(reduce)
    else:
        assert plan["reduce_launch"][0] == 0  # the launcher skips reduce_kernel


def test_inner_sgd_grid_of_a_large_fast_weight_set(host):
    """ResNet-12 size (12.4M weights) at T = 128 tasks: 1.6e9 elements, still one valid grid."""
    shapes = [(128, 12_400_000 // 8, 0, 12_400_000 // 8, 0, 1)] * 8
    (layout, forward, backward) = host("layout", f"inner_sgd_forward 1 {_shape_args(shapes)}",
                                       f"inner_sgd_backward 1 1 1 {_shape_args(shapes)}")
    assert_valid(forward["launch"], layout["constants"]["kForwardThreads"])
    assert_valid(backward["launch"], layout["constants"]["kBackwardThreads"])
    assert forward["launch"][0] == 8 * -(-128 * 1_550_000 // layout["constants"]["kForwardTile"])


def assert_rows_by_features(launch: list[int], rows: int, D: int) -> None:
    """Block (x, y), thread i covers row x, feature y * threads + i: all, and no empty strip."""
    x, y, threads = launch
    assert x == rows and (y - 1) * threads < D <= y * threads, (launch, rows, D)


# (T, Q or S, N, D): Omniglot and miniImageNet episodes, and a large one.
EPISODES = [(4, 75, 5, 64), (32, 75, 5, 1600), (3, 19, 70, 1601), (1024, 600, 20, 16000)]


@pytest.mark.parametrize("T,Q,N,D", EPISODES)
def test_prototypes_and_proto_logits_grids(host, T, Q, N, D):
    protos, logits = host(f"prototypes {T} {N} {Q} {D}", f"proto_logits {T} {Q} {N} {D}")
    for launch in (*protos.values(), *logits.values()):
        assert_valid(launch)
    # prototypes.cuh: one counting thread per (task, class); means per (class, feature);
    # the backward per (support row, feature).
    x, _, threads = protos["counts"]
    assert (x - 1) * threads < T * N <= x * threads
    assert_rows_by_features(protos["forward"], T * N, D)
    assert_rows_by_features(protos["backward"], T * Q, D)
    # proto_logits.cuh: one block per query row (its warps take the prototypes), one warp
    # per row for the cosine norms, and (row, feature) blocks for the two gradients.
    assert logits["forward"][:2] == [T * Q, 1]
    for key, rows in (("query_norms", T * Q), ("proto_norms", T * N)):
        x, _, threads = logits[key]
        assert (x - 1) * (threads // WARP) < rows <= x * (threads // WARP), (key, logits[key])
    assert_rows_by_features(logits["grad_query"], T * Q, D)
    assert_rows_by_features(logits["grad_protos"], T * N, D)
