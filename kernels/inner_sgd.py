"""Triton kernels of ``pymeta::inner_sgd``: ``out[k] = params[k] - scale * lr[k] * grads[k]``.

One launch updates every tensor of a list that shares a dtype (multi-tensor apply): the
host packs, per tensor, its addresses, sizes and strides into one int64 table, and each
program finds its tensor by comparing its id with the table's cumulative tile counts.

Each tensor ``k`` is treated as a ``[rows, cols]`` matrix (rows = the task dim, size 1 for
a 0-dim tensor; cols = product of the other dims). Element ``(t, j)`` of an operand lives at
``t * row_stride + j * col_stride``: params, grads and grad_outs keep their own row stride
(0 for MAML's ``p.expand(T, ...)``: no copy) with dense trailing dims, and ``lr[k]`` is
contiguous with a row stride (per task) and/or a col stride (per element), or both 0.

* forward: tiles of ``BLOCK`` consecutive elements of one tensor (flat index over
  rows x cols, so small and large tensors fill every lane).
* backward: tiles are strips of ``BLOCK`` columns over all rows, so the gradient of an lr
  shared by all tasks sums over rows inside one program; per-task and per-layer lr
  gradients write per-row partial sums, added up by a second, tiny launch.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

FORWARD_BLOCK = 1024
BACKWARD_BLOCK = 256
REDUCE_BLOCK = 128

# Columns of the per-tensor int64 tables the launchers below build (addresses, sizes, strides).
(F_P, F_G, F_OUT, F_LR, F_ROWS, F_COLS, F_P_RS, F_G_RS, F_LR_RS, F_LR_CS) = (tl.constexpr(i) for i in range(10))
F_WIDTH = tl.constexpr(10)
(B_GO, B_G, B_LR, B_GG, B_GLR, B_ROWS, B_COLS, B_GO_RS, B_G_RS, B_LR_RS, B_LR_CS, B_PARTIAL) = (
    tl.constexpr(i) for i in range(12)
)
B_WIDTH = tl.constexpr(12)
(R_PARTIAL, R_ROWS, R_TILES, R_GLR, R_PER_TASK) = (tl.constexpr(i) for i in range(5))
R_WIDTH = tl.constexpr(5)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _neg_scale(scale_ptr, LR_DTYPE: tl.constexpr):
    """``-scale`` in the lr dtype: passed as float64 bits, since a float argument would be fp32."""
    return tl.load(scale_ptr).to(tl.float64, bitcast=True).to(LR_DTYPE)


@triton.jit
def _find_entry(tile_start_ptr, num_entries, ENTRIES_POW2: tl.constexpr):
    """Index of the tensor owning this program's tile, and the tile's index within it."""
    pid = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, ENTRIES_POW2)
    starts = tl.load(tile_start_ptr + idx, mask=idx < num_entries, other=2**62)
    k = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
    return k, pid - tl.load(tile_start_ptr + k)


@triton.jit
def inner_sgd_forward_kernel(
    table_ptr, tile_start_ptr, num_entries, scale_ptr,
    BLOCK: tl.constexpr, ENTRIES_POW2: tl.constexpr, HAS_LR: tl.constexpr,
    DTYPE: tl.constexpr, LR_DTYPE: tl.constexpr,
):
    k, tile = _find_entry(tile_start_ptr, num_entries, ENTRIES_POW2)
    row = table_ptr + k * F_WIDTH
    p_ptr = tl.load(row + F_P).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + F_G).to(tl.pointer_type(DTYPE))
    out_ptr = tl.load(row + F_OUT).to(tl.pointer_type(DTYPE))
    cols = tl.load(row + F_COLS)
    e = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < tl.load(row + F_ROWS) * cols
    t = e // cols
    j = e - t * cols
    p = tl.load(p_ptr + t * tl.load(row + F_P_RS) + j, mask=mask).to(LR_DTYPE)
    g = tl.load(g_ptr + t * tl.load(row + F_G_RS) + j, mask=mask).to(LR_DTYPE)
    neg_scale = _neg_scale(scale_ptr, LR_DTYPE)
    if HAS_LR:
        lr_ptr = tl.load(row + F_LR).to(tl.pointer_type(LR_DTYPE))
        lr = tl.load(lr_ptr + t * tl.load(row + F_LR_RS) + j * tl.load(row + F_LR_CS), mask=mask)
        out = p + neg_scale * lr * g
    else:
        out = p + neg_scale * g
    tl.store(out_ptr + e, out.to(DTYPE), mask=mask)


@triton.jit
def inner_sgd_backward_kernel(
    table_ptr, tile_start_ptr, num_entries, scale_ptr, partial_ptr,
    BLOCK: tl.constexpr, ENTRIES_POW2: tl.constexpr, HAS_LR: tl.constexpr,
    NEED_GRADS: tl.constexpr, NEED_LR: tl.constexpr, DTYPE: tl.constexpr, LR_DTYPE: tl.constexpr,
):
    k, tile = _find_entry(tile_start_ptr, num_entries, ENTRIES_POW2)
    row = table_ptr + k * B_WIDTH
    go_ptr = tl.load(row + B_GO).to(tl.pointer_type(DTYPE))
    rows = tl.load(row + B_ROWS)
    cols = tl.load(row + B_COLS)
    go_rs = tl.load(row + B_GO_RS)
    j = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < cols
    neg_scale = _neg_scale(scale_ptr, LR_DTYPE)
    if HAS_LR:
        lr_ptr = tl.load(row + B_LR).to(tl.pointer_type(LR_DTYPE))
        lr_rs = tl.load(row + B_LR_RS)
        lr_cs = tl.load(row + B_LR_CS)
    if NEED_GRADS:
        gg_ptr = tl.load(row + B_GG).to(tl.pointer_type(DTYPE))
    if NEED_LR:  # implies HAS_LR
        g_ptr = tl.load(row + B_G).to(tl.pointer_type(DTYPE))
        glr_ptr = tl.load(row + B_GLR).to(tl.pointer_type(LR_DTYPE))
        g_rs = tl.load(row + B_G_RS)
        partial = tl.load(row + B_PARTIAL) + tile * rows
        # lr gradients are sums of many products: formed and added in float64 (cheap next to
        # the memory traffic), so they are never less accurate than PyTorch's own sums.
        shared_cols = tl.zeros([BLOCK], dtype=tl.float64)
    for t in range(0, rows):
        go = tl.load(go_ptr + t * go_rs + j, mask=mask, other=0.0).to(LR_DTYPE)
        if NEED_GRADS:
            if HAS_LR:
                gg = neg_scale * tl.load(lr_ptr + t * lr_rs + j * lr_cs, mask=mask) * go
            else:
                gg = neg_scale * go
            tl.store(gg_ptr + t * cols + j, gg.to(DTYPE), mask=mask)
        if NEED_LR:
            g = tl.load(g_ptr + t * g_rs + j, mask=mask, other=0.0).to(LR_DTYPE)
            if lr_cs == 0:  # per task or per layer: one partial sum per row
                tl.store(partial_ptr + partial + t, tl.sum(go.to(tl.float64) * g.to(tl.float64), axis=0))
            elif lr_rs == 0:  # per element, shared by every task
                shared_cols += go.to(tl.float64) * g.to(tl.float64)
            else:  # per task and element
                tl.store(glr_ptr + t * lr_rs + j, neg_scale * (go * g), mask=mask)
    # Separate ifs: lr_cs & co. only exist when the constexpr NEED_LR is true.
    if NEED_LR:  # noqa: SIM102
        if lr_cs != 0 and lr_rs == 0:  # an lr shared by every task: its sum over the rows above
            tl.store(glr_ptr + j, (_neg_scale(scale_ptr, tl.float64) * shared_cols).to(LR_DTYPE), mask=mask)


@triton.jit
def inner_sgd_reduce_kernel(table_ptr, scale_ptr, partial_ptr, BLOCK: tl.constexpr, LR_DTYPE: tl.constexpr):
    """grad_lr of a per-task ([T]) or per-layer ([]) lr from the backward's per-row partials."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * R_WIDTH
    partial = tl.load(row + R_PARTIAL)
    rows = tl.load(row + R_ROWS)
    tiles = tl.load(row + R_TILES)
    glr_ptr = tl.load(row + R_GLR).to(tl.pointer_type(LR_DTYPE))
    per_task = tl.load(row + R_PER_TASK)
    neg_scale = _neg_scale(scale_ptr, tl.float64)
    total = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
    for t0 in range(0, rows, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        mask = t < rows
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for tile in range(0, tiles):  # in tile order: deterministic
            acc += tl.load(partial_ptr + partial + tile * rows + t, mask=mask, other=0.0)
        if per_task != 0:
            tl.store(glr_ptr + t, (neg_scale * acc).to(LR_DTYPE), mask=mask)
        total += tl.sum(acc, axis=0)
    if per_task == 0:
        tl.store(glr_ptr, (neg_scale * total).to(LR_DTYPE))


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _as_rows(x: Tensor) -> tuple[Tensor, int]:
    """``x`` (or a dense copy when its trailing dims are not dense) and its row stride."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            x = x.contiguous()
            break
        expected *= size
    return x, (x.stride(0) if x.dim() else 0)


def _rows_cols(x: Tensor) -> tuple[int, int]:
    rows = x.shape[0] if x.dim() else 1
    return rows, (x.numel() // rows if rows else 0)


def _lr_strides(lr: Tensor, param: Tensor) -> tuple[Tensor, int, int]:
    """Contiguous ``lr`` and its (row, col) strides over ``param``'s ``[rows, cols]`` view."""
    per_task = lr.dim() == param.dim() > 0 and lr.shape[0] != 1
    per_task_numel = lr.numel() // (lr.shape[0] if per_task else 1)
    return lr.contiguous(), (per_task_numel if per_task else 0), (1 if per_task_numel > 1 else 0)


def _by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of the non-empty tensors, grouped by dtype: one launch per group."""
    groups: dict[torch.dtype, list[int]] = {}
    for k, x in enumerate(tensors):
        if x.numel():
            groups.setdefault(x.dtype, []).append(k)
    return groups


def _upload(scale: float, starts: list[int], table: list[list[int]], device: torch.device) -> tuple[Tensor, ...]:
    """``-scale`` (as float64 bits), the tile starts and the table on ``device``, in one copy."""
    neg_scale_bits = struct.unpack("<q", struct.pack("<d", -scale))[0]
    packed = torch.tensor([neg_scale_bits, *starts, *(v for r in table for v in r)], dtype=torch.int64)
    # From pageable memory the copy is staged before `to` returns: no need to sync the stream.
    packed = packed.to(device, non_blocking=True)
    return packed[:1], packed[1 : 1 + len(starts)], packed[1 + len(starts) :]


def forward(params: list[Tensor], grads: list[Tensor], lr: list[Tensor], scale: float) -> list[Tensor]:
    """``[params[k] - scale * lr[k] * grads[k]]`` (``lr`` empty: ``scale`` alone); see the op."""
    outs = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
    # The tables hold raw addresses: dense copies made by _as_rows / _lr_strides must stay
    # alive until the launch (later frees are stream-ordered, hence safe).
    keep: list[Tensor] = []
    for dtype, ks in _by_dtype(params).items():
        table, starts = [], [0]
        for k in ks:
            p, p_rs = _as_rows(params[k])
            g, g_rs = _as_rows(grads[k])
            rows, cols = _rows_cols(p)
            entry = [0] * F_WIDTH.value
            entry[F_P], entry[F_G], entry[F_OUT] = p.data_ptr(), g.data_ptr(), outs[k].data_ptr()
            entry[F_ROWS], entry[F_COLS], entry[F_P_RS], entry[F_G_RS] = rows, cols, p_rs, g_rs
            keep += [p, g]
            if lr:
                lr_k, entry[F_LR_RS], entry[F_LR_CS] = _lr_strides(lr[k], params[k])
                entry[F_LR] = lr_k.data_ptr()
                keep.append(lr_k)
            table.append(entry)
            starts.append(starts[-1] + triton.cdiv(rows * cols, FORWARD_BLOCK))
        scale_dev, starts_dev, table_dev = _upload(scale, starts, table, params[0].device)
        inner_sgd_forward_kernel[(starts[-1],)](
            table_dev, starts_dev, len(ks), scale_dev,
            BLOCK=FORWARD_BLOCK, ENTRIES_POW2=_pow2(len(ks)), HAS_LR=bool(lr),
            DTYPE=_TL_DTYPES[dtype], LR_DTYPE=_TL_DTYPES[torch.promote_types(dtype, torch.float32)],
        )
    return outs


def backward(
    grad_outs: list[Tensor], grads: list[Tensor], lr: list[Tensor], scale: float, need_grads: bool, need_lr: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """``grad_grads[k] = -scale * lr[k] * grad_outs[k]`` and ``grad_lr[k] = -scale *
    sum(grads[k] * grad_outs[k])`` reduced to ``lr[k]``'s shape (each list empty when not needed)."""
    need_lr = need_lr and bool(lr)
    grad_grads = [torch.empty(go.shape, dtype=go.dtype, device=go.device) for go in grad_outs] if need_grads else []
    # Zero-size tensors launch nothing, so their lr gradient must start at zero.
    grad_lr = [(torch.empty if go.numel() else torch.zeros)(r.shape, dtype=r.dtype, device=r.device)
               for go, r in zip(grad_outs, lr, strict=True)] if need_lr else []
    keep: list[Tensor] = []  # as in forward(): copies live until the launches
    for dtype, ks in _by_dtype(grad_outs).items():
        acc = torch.promote_types(dtype, torch.float32)
        device = grad_outs[0].device
        table, starts, reduce_table, partials = [], [0], [], 0
        for k in ks:
            go, go_rs = _as_rows(grad_outs[k])
            rows, cols = _rows_cols(go)
            tiles = triton.cdiv(cols, BACKWARD_BLOCK)
            entry = [0] * B_WIDTH.value
            entry[B_GO], entry[B_ROWS], entry[B_COLS], entry[B_GO_RS] = go.data_ptr(), rows, cols, go_rs
            keep.append(go)
            if lr:
                lr_k, entry[B_LR_RS], entry[B_LR_CS] = _lr_strides(lr[k], grad_outs[k])
                entry[B_LR] = lr_k.data_ptr()
                keep.append(lr_k)
            if need_grads:
                entry[B_GG] = grad_grads[k].data_ptr()
            if need_lr:
                g, entry[B_G_RS] = _as_rows(grads[k])
                entry[B_G], entry[B_GLR] = g.data_ptr(), grad_lr[k].data_ptr()
                keep.append(g)
                if entry[B_LR_CS] == 0:
                    entry[B_PARTIAL] = partials
                    reduce_entry = [0] * R_WIDTH.value
                    reduce_entry[R_PARTIAL], reduce_entry[R_ROWS], reduce_entry[R_TILES] = partials, rows, tiles
                    reduce_entry[R_GLR], reduce_entry[R_PER_TASK] = grad_lr[k].data_ptr(), int(entry[B_LR_RS] != 0)
                    reduce_table.append(reduce_entry)
                    partials += tiles * rows
            table.append(entry)
            starts.append(starts[-1] + tiles)
        scale_dev, starts_dev, table_dev = _upload(scale, starts, table + reduce_table, device)
        partial = torch.empty(max(partials, 1), dtype=torch.float64, device=device)
        inner_sgd_backward_kernel[(starts[-1],)](
            table_dev, starts_dev, len(ks), scale_dev, partial,
            BLOCK=BACKWARD_BLOCK, ENTRIES_POW2=_pow2(len(ks)), HAS_LR=bool(lr), NEED_GRADS=need_grads,
            NEED_LR=need_lr, DTYPE=_TL_DTYPES[dtype], LR_DTYPE=_TL_DTYPES[acc],
        )
        if reduce_table:  # per-task / per-layer lr gradients: add up the per-row partial sums
            inner_sgd_reduce_kernel[(len(reduce_table),)](
                table_dev[len(table) * B_WIDTH.value :], scale_dev, partial, BLOCK=REDUCE_BLOCK, LR_DTYPE=_TL_DTYPES[acc]
            )
    return grad_grads, grad_lr


def _ptx_cases() -> list[dict]:
    """Kernels compiled to PTX for sm_80 / sm_90 by tests/test_compile_kernels.py: every dtype
    family and every branch the launchers above can take."""
    pointers = {"table_ptr": "*i64", "tile_start_ptr": "*i64", "num_entries": "i32", "scale_ptr": "*i64"}
    cases = []
    for dtype, lr_dtype in ((tl.float32, tl.float32), (tl.bfloat16, tl.float32), (tl.float16, tl.float32),
                            (tl.float64, tl.float64)):
        types = {"DTYPE": dtype, "LR_DTYPE": lr_dtype, "ENTRIES_POW2": 32}
        for has_lr in (True, False):
            cases.append({"fn": inner_sgd_forward_kernel, "signature": pointers,
                          "constexprs": {**types, "BLOCK": FORWARD_BLOCK, "HAS_LR": has_lr}})
        for has_lr, need_grads, need_lr in ((True, True, True), (True, True, False), (True, False, True),
                                            (False, True, False)):
            cases.append({"fn": inner_sgd_backward_kernel, "signature": {**pointers, "partial_ptr": "*fp64"},
                          "constexprs": {**types, "BLOCK": BACKWARD_BLOCK, "HAS_LR": has_lr,
                                         "NEED_GRADS": need_grads, "NEED_LR": need_lr}})
        if dtype == lr_dtype:  # the reduction only sees the lr dtype
            cases.append({"fn": inner_sgd_reduce_kernel,
                          "signature": {"table_ptr": "*i64", "scale_ptr": "*i64", "partial_ptr": "*fp64"},
                          "constexprs": {"BLOCK": REDUCE_BLOCK, "LR_DTYPE": lr_dtype}})
    return cases


PTX_CHECKS = _ptx_cases()
