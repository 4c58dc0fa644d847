"""Triton kernels of ``pymeta::memory_access`` (one MANN step) and its backward.

One program per task holds the task's whole ``[R, W]`` memory as a register tile
(``BLOCK_R x BLOCK_W``, the next powers of two; ``pymeta.ops.memory_access`` sends
larger memories to another backend) and loops over the H heads at compile time
(``H`` is a constexpr: a model has one head count). The formulas are in
``pymeta/ops/memory_access.py``.

Least-used rows: H rounds of "smallest usage among the rows not yet chosen, then the
smallest index holding it", i.e. ties go to the lowest index, as in every backend.

``gamma`` and ``eps`` are float64 arguments (a float32 ``eps`` would shift the cosine
of a fresh, near-zero memory in float64 runs) cast to the accumulation type once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _as(value, ACC: tl.constexpr):
    # A float argument (fp64 when compiled, a Python float when interpreted) in ACC.
    return (tl.full((), 0.0, ACC) + value).to(ACC)


@triton.jit
def _forward_kernel(
    mem_ptr, usage_ptr, wr_ptr, keys_ptr, adds_ptr, gates_ptr,
    reads_ptr, wr_out_ptr, mem_out_ptr, usage_out_ptr, lu_ptr,
    R, W, gamma: tl.float64, eps: tl.float64,
    H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    hh = tl.arange(0, BLOCK_H)
    r_ok, w_ok = r < R, w < W
    u = tl.load(usage_ptr + t * R + r, mask=r_ok, other=0.0).to(ACC)
    # The H least-used rows, ascending, ties to the lowest index.
    free = r_ok
    lu = tl.zeros((BLOCK_H,), dtype=tl.int32)
    for h in tl.static_range(H):
        smallest = tl.min(tl.where(free, u, float("inf")), axis=0)
        row = tl.min(tl.where(free & (u == smallest), r, BLOCK_R), axis=0)
        free = free & (r != row)
        lu = tl.where(hh == h, row, lu)
    tl.store(lu_ptr + t * H + hh, lu.to(tl.int64), mask=hh < H)
    lu0 = tl.sum(tl.where(hh == 0, lu, 0), axis=0)

    tile = r[:, None] * W + w[None, :]
    tile_ok = r_ok[:, None] & w_ok[None, :]
    m = tl.load(mem_ptr + t * R * W + tile, mask=tile_ok, other=0.0).to(ACC)
    m = tl.where((r == lu0)[:, None], 0.0, m)  # the least-used row is zeroed before the write
    new_usage = _as(gamma, ACC) * u
    for h in tl.static_range(H):
        g = tl.load(gates_ptr + t * H + h).to(ACC)
        lu_h = tl.sum(tl.where(hh == h, lu, 0), axis=0)
        wr_prev = tl.load(wr_ptr + (t * H + h) * R + r, mask=r_ok, other=0.0).to(ACC)
        ww = g * wr_prev + tl.where(r == lu_h, 1 - g, 0.0)
        a = tl.load(adds_ptr + (t * H + h) * W + w, mask=w_ok, other=0.0).to(ACC)
        m += ww[:, None] * a[None, :]
        new_usage += ww
    tl.store(mem_out_ptr + t * R * W + tile, m.to(mem_out_ptr.dtype.element_ty), mask=tile_ok)

    mm = tl.sum(m * m, axis=1)
    for h in tl.static_range(H):
        k = tl.load(keys_ptr + (t * H + h) * W + w, mask=w_ok, other=0.0).to(ACC)
        norm = tl.sqrt(tl.sum(k * k, axis=0) * mm + _as(eps, ACC))
        sim = tl.where(r_ok, tl.sum(m * k[None, :], axis=1) / norm, float("-inf"))
        e = tl.exp(sim - tl.max(sim, axis=0))
        weights = e / tl.sum(e, axis=0)
        tl.store(wr_out_ptr + (t * H + h) * R + r, weights.to(wr_out_ptr.dtype.element_ty), mask=r_ok)
        read = tl.sum(weights[:, None] * m, axis=0)
        tl.store(reads_ptr + (t * H + h) * W + w, read.to(reads_ptr.dtype.element_ty), mask=w_ok)
        new_usage += weights
    tl.store(usage_out_ptr + t * R + r, new_usage.to(usage_out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _backward_kernel(
    g_reads_ptr, g_wr_ptr, g_mem_ptr, g_usage_ptr, wr_prev_ptr, keys_ptr, adds_ptr, gates_ptr, wr_ptr, mem_ptr, lu_ptr,
    o_mem_ptr, o_usage_ptr, o_wr_prev_ptr, o_keys_ptr, o_adds_ptr, o_gates_ptr,
    R, W, gamma: tl.float64, eps: tl.float64,
    H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    r_ok, w_ok = r < R, w < W
    tile = r[:, None] * W + w[None, :]
    tile_ok = r_ok[:, None] & w_ok[None, :]
    m = tl.load(mem_ptr + t * R * W + tile, mask=tile_ok, other=0.0).to(ACC)  # the new memory
    mm = tl.sum(m * m, axis=1)
    gu = tl.load(g_usage_ptr + t * R + r, mask=r_ok, other=0.0).to(ACC)
    g_mem = tl.load(g_mem_ptr + t * R * W + tile, mask=tile_ok, other=0.0).to(ACC)
    row_scale = tl.zeros((BLOCK_R,), dtype=ACC)
    # Reads, softmax and cosine, head by head: gradients of the keys and the new memory.
    for h in tl.static_range(H):
        k = tl.load(keys_ptr + (t * H + h) * W + w, mask=w_ok, other=0.0).to(ACC)
        kk = tl.sum(k * k, axis=0)
        norm = tl.sqrt(kk * mm + _as(eps, ACC))
        sim = tl.sum(m * k[None, :], axis=1) / norm
        weights = tl.load(wr_ptr + (t * H + h) * R + r, mask=r_ok, other=0.0).to(ACC)
        g_read = tl.load(g_reads_ptr + (t * H + h) * W + w, mask=w_ok, other=0.0).to(ACC)
        g_weights = tl.load(g_wr_ptr + (t * H + h) * R + r, mask=r_ok, other=0.0).to(ACC) + gu
        g_weights += tl.sum(m * g_read[None, :], axis=1)
        g_sim = weights * (g_weights - tl.sum(weights * g_weights, axis=0))
        c = tl.where(r_ok, g_sim / norm, 0.0)
        e = tl.where(r_ok, g_sim * sim / (norm * norm), 0.0)
        g_key = tl.sum(c[:, None] * m, axis=0) - k * tl.sum(e * mm, axis=0)
        tl.store(o_keys_ptr + (t * H + h) * W + w, g_key.to(o_keys_ptr.dtype.element_ty), mask=w_ok)
        g_mem += weights[:, None] * g_read[None, :] + c[:, None] * k[None, :]
        row_scale += e * kk
    g_mem -= m * row_scale[:, None]
    # The write: adds, write weights (previous read weights and gates), the old memory.
    for h in tl.static_range(H):
        lu_h = tl.load(lu_ptr + t * H + h)
        g = tl.load(gates_ptr + t * H + h).to(ACC)
        wr_prev = tl.load(wr_prev_ptr + (t * H + h) * R + r, mask=r_ok, other=0.0).to(ACC)
        is_lu = tl.where(r == lu_h, 1.0, 0.0).to(ACC)
        ww = g * wr_prev + (1 - g) * is_lu
        a = tl.load(adds_ptr + (t * H + h) * W + w, mask=w_ok, other=0.0).to(ACC)
        g_ww = tl.where(r_ok, tl.sum(g_mem * a[None, :], axis=1) + gu, 0.0)
        g_add = tl.sum(ww[:, None] * g_mem, axis=0)
        tl.store(o_adds_ptr + (t * H + h) * W + w, g_add.to(o_adds_ptr.dtype.element_ty), mask=w_ok)
        tl.store(o_wr_prev_ptr + (t * H + h) * R + r, (g * g_ww).to(o_wr_prev_ptr.dtype.element_ty), mask=r_ok)
        g_gate = tl.sum(g_ww * (wr_prev - is_lu), axis=0)
        tl.store(o_gates_ptr + t * H + h, g_gate.to(o_gates_ptr.dtype.element_ty))
    lu0 = tl.load(lu_ptr + t * H)
    g_old = tl.where((r == lu0)[:, None], 0.0, g_mem)
    tl.store(o_mem_ptr + t * R * W + tile, g_old.to(o_mem_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(o_usage_ptr + t * R + r, (_as(gamma, ACC) * gu).to(o_usage_ptr.dtype.element_ty), mask=r_ok)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(R: int, W: int) -> dict:
    return {"BLOCK_R": triton.next_power_of_2(R), "BLOCK_W": triton.next_power_of_2(W)}


def _launch(R: int, W: int) -> dict:
    """Tile sizes and warps: 8 warps past 2048 tile elements keep a thread's share small."""
    blocks = _blocks(R, W)
    return {**blocks, "num_warps": 8 if blocks["BLOCK_R"] * blocks["BLOCK_W"] > 2048 else 4}


def forward(
    memory: Tensor, usage: Tensor, read_weights: Tensor, keys: Tensor, adds: Tensor, gates: Tensor,
    gamma: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(reads, read_weights', memory', usage', least_used)``; shapes as ``pymeta.ops.memory_access``."""
    memory, usage, read_weights, keys, adds, gates = (
        x.contiguous() for x in (memory, usage, read_weights, keys, adds, gates))
    T, R, W = memory.shape
    H = keys.shape[1]
    outs = (torch.empty_like(keys), torch.empty_like(read_weights), torch.empty_like(memory), torch.empty_like(usage),
            torch.empty(T, H, dtype=torch.int64, device=memory.device))
    if T:
        _forward_kernel[(T,)](
            memory, usage, read_weights, keys, adds, gates, *outs, R, W, gamma, eps,
            H=H, BLOCK_H=triton.next_power_of_2(H), ACC=_acc(memory.dtype), **_launch(R, W),
        )
    return outs


def backward(
    grad_reads: Tensor, grad_read_weights: Tensor, grad_memory: Tensor, grad_usage: Tensor,
    read_weights: Tensor, keys: Tensor, adds: Tensor, gates: Tensor,
    new_read_weights: Tensor, new_memory: Tensor, least_used: Tensor, gamma: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. ``(memory, usage, read_weights, keys, adds, gates)``."""
    ins = tuple(x.contiguous() for x in (grad_reads, grad_read_weights, grad_memory, grad_usage, read_weights, keys,
                                         adds, gates, new_read_weights, new_memory, least_used))
    T, R, W = new_memory.shape
    outs = tuple(torch.empty_like(x) for x in (new_memory, grad_usage, read_weights, keys, adds, gates))
    if T:
        _backward_kernel[(T,)](
            *ins, *outs, R, W, gamma, eps, H=keys.shape[1], ACC=_acc(new_memory.dtype), **_launch(R, W),
        )
    return outs


def _ptx_cases() -> list[dict]:
    """Signatures compiled to PTX by tests/test_compile_kernels.py.

    Small tiles (16 x 16, 2 heads) run the same code paths as MANN's 128 x 64 tile with 4
    heads, which takes ptxas about 50 s per kernel and arch. float16 is left out: its
    loads and stores convert like bfloat16's.
    """
    cases = []
    blocks = {"H": 2, **_blocks(16, 16)}
    for dtype, acc in (("fp32", tl.float32), ("fp64", tl.float64), ("bf16", tl.float32)):
        scalars = {"R": "i32", "W": "i32", "gamma": "fp64", "eps": "fp64"}
        forward_ptrs = ("mem_ptr", "usage_ptr", "wr_ptr", "keys_ptr", "adds_ptr", "gates_ptr",
                        "reads_ptr", "wr_out_ptr", "mem_out_ptr", "usage_out_ptr")
        cases.append({
            "fn": _forward_kernel,
            "signature": {**{p: f"*{dtype}" for p in forward_ptrs}, "lu_ptr": "*i64", **scalars},
            "constexprs": {**blocks, "BLOCK_H": 2, "ACC": acc},
        })
        backward_ptrs = ("g_reads_ptr", "g_wr_ptr", "g_mem_ptr", "g_usage_ptr", "wr_prev_ptr", "keys_ptr", "adds_ptr",
                         "gates_ptr", "wr_ptr", "mem_ptr")
        outputs = ("o_mem_ptr", "o_usage_ptr", "o_wr_prev_ptr", "o_keys_ptr", "o_adds_ptr", "o_gates_ptr")
        cases.append({
            "fn": _backward_kernel,
            "signature": {**{p: f"*{dtype}" for p in backward_ptrs}, "lu_ptr": "*i64",
                          **{p: f"*{dtype}" for p in outputs}, **scalars},
            "constexprs": {**blocks, "ACC": acc},
        })
    return cases


PTX_CHECKS = _ptx_cases()
