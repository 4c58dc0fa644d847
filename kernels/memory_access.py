"""Triton kernels of ``pymeta::memory_access`` (one MANN step) and its backward.

One program per task holds the task's whole ``[R, W]`` memory as a register tile
(``BLOCK_R x BLOCK_W``, the next powers of two; ``pymeta.ops.memory_access`` sends
larger memories to another backend) and the heads as ``[BLOCK_H, ...]`` tiles, so the
cosine similarities, the reads and the write are ``tl.dot`` products for all heads at
once (IEEE precision: TF32 would round the memory). The formulas are in
``pymeta/ops/memory_access.py``.

Least-used rows: the rank of every row in (usage, row index) order, from one
``[BLOCK_R, BLOCK_R]`` comparison; row ``lu[h]`` has rank ``h``. Ties go to the lowest
index, as in every backend. (Fewer reductions than H rounds of argmin: each reduction
is a device-function call, which the Triton interpreter makes slow.)

``gamma`` and ``eps`` are float64 arguments (a float32 ``eps`` would shift the cosine
of a fresh, near-zero memory in float64 runs) cast to the accumulation type once, by
adding them to an ACC zero (when interpreted they are Python floats, which have no
``.to``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _forward_kernel(
    mem_ptr, usage_ptr, wr_ptr, keys_ptr, adds_ptr, gates_ptr,
    reads_ptr, wr_out_ptr, mem_out_ptr, usage_out_ptr, lu_ptr,
    R, W, H, gamma: tl.float64, eps: tl.float64,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    gamma_acc = (tl.full((), 0.0, ACC) + gamma).to(ACC)
    eps_acc = (tl.full((), 0.0, ACC) + eps).to(ACC)
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    hh = tl.arange(0, BLOCK_H)
    r_ok, w_ok, h_ok = r < R, w < W, hh < H
    u = tl.load(usage_ptr + t * R + r, mask=r_ok, other=0.0).to(ACC)
    # The H least-used rows: each row's rank in (usage, index) order, ties to the lower
    # index; lu[h] is the row of rank h.
    j = tl.arange(0, BLOCK_R)[None, :]
    u_j = tl.reshape(u, (1, BLOCK_R))
    before = (j < R) & ((u_j < u[:, None]) | ((u_j == u[:, None]) & (j < r[:, None])))
    rank = tl.sum(before.to(tl.int32), axis=1)
    lu = tl.sum(tl.where((rank[None, :] == hh[:, None]) & r_ok[None, :], r[None, :], 0), axis=1)
    tl.store(lu_ptr + t * H + hh, lu.to(tl.int64), mask=h_ok)
    lu0 = tl.sum(tl.where((rank == 0) & r_ok, r, 0), axis=0)

    hr = hh[:, None] * R + r[None, :]
    hr_ok = h_ok[:, None] & r_ok[None, :]
    hw = hh[:, None] * W + w[None, :]
    hw_ok = h_ok[:, None] & w_ok[None, :]
    rw = r[:, None] * W + w[None, :]
    rw_ok = r_ok[:, None] & w_ok[None, :]
    g = tl.load(gates_ptr + t * H + hh, mask=h_ok, other=0.0).to(ACC)[:, None]
    wr_prev = tl.load(wr_ptr + t * H * R + hr, mask=hr_ok, other=0.0).to(ACC)
    ww = g * wr_prev + tl.where(r[None, :] == lu[:, None], 1 - g, 0.0)  # [BLOCK_H, BLOCK_R]
    adds = tl.load(adds_ptr + t * H * W + hw, mask=hw_ok, other=0.0).to(ACC)
    m = tl.load(mem_ptr + t * R * W + rw, mask=rw_ok, other=0.0).to(ACC)
    m = tl.where((r == lu0)[:, None], 0.0, m)  # the least-used row is zeroed before the write
    m += tl.dot(tl.trans(ww), adds, input_precision="ieee")
    tl.store(mem_out_ptr + t * R * W + rw, m.to(mem_out_ptr.dtype.element_ty), mask=rw_ok)

    keys = tl.load(keys_ptr + t * H * W + hw, mask=hw_ok, other=0.0).to(ACC)
    norm = tl.sqrt(tl.sum(keys * keys, axis=1)[:, None] * tl.sum(m * m, axis=1)[None, :] + eps_acc)
    sim = tl.where(r_ok[None, :], tl.dot(keys, tl.trans(m), input_precision="ieee") / norm, float("-inf"))
    e = tl.exp(sim - tl.max(sim, axis=1)[:, None])
    weights = e / tl.sum(e, axis=1)[:, None]
    tl.store(wr_out_ptr + t * H * R + hr, weights.to(wr_out_ptr.dtype.element_ty), mask=hr_ok)
    reads = tl.dot(weights, m, input_precision="ieee")
    tl.store(reads_ptr + t * H * W + hw, reads.to(reads_ptr.dtype.element_ty), mask=hw_ok)
    new_usage = gamma_acc * u + tl.sum(tl.where(h_ok[:, None], weights + ww, 0.0), axis=0)
    tl.store(usage_out_ptr + t * R + r, new_usage.to(usage_out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _backward_kernel(
    g_reads_ptr, g_wr_ptr, g_mem_ptr, g_usage_ptr, wr_prev_ptr, keys_ptr, adds_ptr, gates_ptr, wr_ptr, mem_ptr, lu_ptr,
    o_mem_ptr, o_usage_ptr, o_wr_prev_ptr, o_keys_ptr, o_adds_ptr, o_gates_ptr,
    R, W, H, gamma: tl.float64, eps: tl.float64,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    gamma_acc = (tl.full((), 0.0, ACC) + gamma).to(ACC)
    eps_acc = (tl.full((), 0.0, ACC) + eps).to(ACC)
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    hh = tl.arange(0, BLOCK_H)
    r_ok, w_ok, h_ok = r < R, w < W, hh < H
    hr = hh[:, None] * R + r[None, :]
    hr_ok = h_ok[:, None] & r_ok[None, :]
    hw = hh[:, None] * W + w[None, :]
    hw_ok = h_ok[:, None] & w_ok[None, :]
    rw = r[:, None] * W + w[None, :]
    rw_ok = r_ok[:, None] & w_ok[None, :]
    m = tl.load(mem_ptr + t * R * W + rw, mask=rw_ok, other=0.0).to(ACC)  # the new memory
    keys = tl.load(keys_ptr + t * H * W + hw, mask=hw_ok, other=0.0).to(ACC)
    weights = tl.load(wr_ptr + t * H * R + hr, mask=hr_ok, other=0.0).to(ACC)
    g_reads = tl.load(g_reads_ptr + t * H * W + hw, mask=hw_ok, other=0.0).to(ACC)
    gu = tl.load(g_usage_ptr + t * R + r, mask=r_ok, other=0.0).to(ACC)
    # Reads, softmax and cosine: gradients of the keys and the new memory.
    kk = tl.sum(keys * keys, axis=1)
    mm = tl.sum(m * m, axis=1)
    norm = tl.sqrt(kk[:, None] * mm[None, :] + eps_acc)
    sim = tl.dot(keys, tl.trans(m), input_precision="ieee") / norm
    g_weights = tl.load(g_wr_ptr + t * H * R + hr, mask=hr_ok, other=0.0).to(ACC) + gu[None, :]
    g_weights += tl.dot(g_reads, tl.trans(m), input_precision="ieee")
    g_sim = weights * (g_weights - tl.sum(weights * g_weights, axis=1)[:, None])
    c = tl.where(hr_ok, g_sim / norm, 0.0)
    e = tl.where(hr_ok, g_sim * sim / (norm * norm), 0.0)
    g_keys = tl.dot(c, m, input_precision="ieee") - keys * tl.sum(e * mm[None, :], axis=1)[:, None]
    tl.store(o_keys_ptr + t * H * W + hw, g_keys.to(o_keys_ptr.dtype.element_ty), mask=hw_ok)
    g_mem = tl.load(g_mem_ptr + t * R * W + rw, mask=rw_ok, other=0.0).to(ACC)
    g_mem += tl.dot(tl.trans(weights), g_reads, input_precision="ieee")
    g_mem += tl.dot(tl.trans(c), keys, input_precision="ieee") - m * tl.sum(e * kk[:, None], axis=0)[:, None]
    # The write: adds, write weights (previous read weights and gates), the old memory.
    lu = tl.load(lu_ptr + t * H + hh, mask=h_ok, other=-1)
    is_lu = tl.where(r[None, :] == lu[:, None], 1.0, 0.0).to(ACC)
    g = tl.load(gates_ptr + t * H + hh, mask=h_ok, other=0.0).to(ACC)[:, None]
    wr_prev = tl.load(wr_prev_ptr + t * H * R + hr, mask=hr_ok, other=0.0).to(ACC)
    ww = g * wr_prev + (1 - g) * is_lu
    adds = tl.load(adds_ptr + t * H * W + hw, mask=hw_ok, other=0.0).to(ACC)
    g_ww = tl.where(hr_ok, tl.dot(adds, tl.trans(g_mem), input_precision="ieee") + gu[None, :], 0.0)
    g_adds = tl.dot(ww, g_mem, input_precision="ieee")
    tl.store(o_adds_ptr + t * H * W + hw, g_adds.to(o_adds_ptr.dtype.element_ty), mask=hw_ok)
    tl.store(o_wr_prev_ptr + t * H * R + hr, (g * g_ww).to(o_wr_prev_ptr.dtype.element_ty), mask=hr_ok)
    g_gates = tl.sum(g_ww * (wr_prev - is_lu), axis=1)
    tl.store(o_gates_ptr + t * H + hh, g_gates.to(o_gates_ptr.dtype.element_ty), mask=h_ok)
    lu0 = tl.load(lu_ptr + t * H)
    g_old = tl.where((r == lu0)[:, None], 0.0, g_mem)
    tl.store(o_mem_ptr + t * R * W + rw, g_old.to(o_mem_ptr.dtype.element_ty), mask=rw_ok)
    tl.store(o_usage_ptr + t * R + r, (gamma_acc * gu).to(o_usage_ptr.dtype.element_ty), mask=r_ok)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(R: int, W: int, H: int) -> dict:
    """Tile sizes: powers of two, and at least 16 for ``tl.dot``."""
    return {"BLOCK_R": max(16, triton.next_power_of_2(R)), "BLOCK_W": max(16, triton.next_power_of_2(W)),
            "BLOCK_H": max(16, triton.next_power_of_2(H))}


def _launch(R: int, W: int, H: int) -> dict:
    """Tile sizes and warps: 8 warps past 2048 tile elements keep a thread's share small."""
    blocks = _blocks(R, W, H)
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
            memory, usage, read_weights, keys, adds, gates, *outs, R, W, H, gamma, eps,
            ACC=_acc(memory.dtype), **_launch(R, W, H),
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
            *ins, *outs, R, W, keys.shape[1], gamma, eps, ACC=_acc(new_memory.dtype), **_launch(R, W, keys.shape[1]),
        )
    return outs


def _ptx_cases() -> list[dict]:
    """Signatures compiled to PTX by tests/test_compile_kernels.py.

    The smallest tiles (16 rows x 16 features) run the same code as MANN's 128 x 64 tile,
    which takes 10 to 30 s per kernel and arch to compile. float32 and float64 only: half
    precision differs in the conversions of loads and stores alone.
    """
    cases = []
    blocks = _blocks(16, 16, 2)
    for dtype, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
        scalars = {"R": "i32", "W": "i32", "H": "i32", "gamma": "fp64", "eps": "fp64"}
        forward_ptrs = ("mem_ptr", "usage_ptr", "wr_ptr", "keys_ptr", "adds_ptr", "gates_ptr",
                        "reads_ptr", "wr_out_ptr", "mem_out_ptr", "usage_out_ptr")
        cases.append({
            "fn": _forward_kernel,
            "signature": {**{p: f"*{dtype}" for p in forward_ptrs}, "lu_ptr": "*i64", **scalars},
            "constexprs": {**blocks, "ACC": acc},
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
