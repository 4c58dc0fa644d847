"""Triton kernels of ``pymeta::prototypes`` (per-task class means) and its backward.

Forward: one program per ``(task, block of classes, block of D)`` walks over the support
set in ``BLOCK_S`` rows, building the ``[BLOCK_N, BLOCK_S]`` one-hot tile of the labels in
registers and accumulating ``one_hot @ support`` with ``tl.dot`` (IEEE precision: the
one-hot is exact, TF32 would round the features) and the class counts beside it.

Backward: ``grad_support[t, s] = grad[t, labels[t, s]] / count[t, labels[t, s]]``, one
program per ``(task, block of support rows, block of D)``; the counts of the block's
labels are recounted from the task's labels, which is cheap next to the gather.

The caller has checked the labels (range, no empty class); out-of-range labels are still
masked so a direct call can never read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_S = 32
BLOCK_D = 64


@triton.jit
def _forward_kernel(
    x_ptr, lab_ptr, out_ptr, S, N, D,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    classes = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    sums = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    counts = tl.zeros((BLOCK_N,), dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < S
        lab = tl.load(lab_ptr + task * S + s, mask=s_ok, other=0)
        one_hot = ((lab[None, :] == classes[:, None]) & s_ok[None, :]).to(ACC)
        x_mask = s_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + task * S * D + s[:, None] * D + d[None, :], mask=x_mask, other=0.0)
        sums += tl.dot(one_hot, x.to(ACC), input_precision="ieee")
        counts += tl.sum(one_hot, axis=1)
    out_mask = (classes < N)[:, None] & d_ok[None, :]
    means = sums / tl.maximum(counts, 1.0)[:, None]  # counts >= 1 for real classes
    out_ptrs = out_ptr + task * N * D + classes[:, None] * D + d[None, :]
    tl.store(out_ptrs, means.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _backward_kernel(
    g_ptr, lab_ptr, gx_ptr, S, N, D,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    s_ok, d_ok = s < S, d < D
    lab = tl.load(lab_ptr + task * S + s, mask=s_ok, other=0)
    valid = s_ok & (lab >= 0) & (lab < N)
    counts = tl.zeros((BLOCK_S,), dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        other = s0 + tl.arange(0, BLOCK_S)
        other_ok = other < S
        lab2 = tl.load(lab_ptr + task * S + other, mask=other_ok, other=0)
        counts += tl.sum(((lab[:, None] == lab2[None, :]) & other_ok[None, :]).to(ACC), axis=1)
    mask = valid[:, None] & d_ok[None, :]
    g = tl.load(g_ptr + task * N * D + lab[:, None] * D + d[None, :], mask=mask, other=0.0)
    gx = g.to(ACC) / tl.maximum(counts, 1.0)[:, None]
    tl.store(gx_ptr + task * S * D + s[:, None] * D + d[None, :], gx.to(gx_ptr.dtype.element_ty),
             mask=s_ok[:, None] & d_ok[None, :])


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_n(n: int) -> int:
    # tl.dot needs every tile dim >= 16; past 64 classes, tile over N.
    return min(max(16, triton.next_power_of_2(n)), 64)


def forward(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means ``[T, n_way, D]`` of ``support: [T, S, D]`` grouped by ``labels: [T, S]``."""
    support, labels = support.contiguous(), labels.contiguous()
    T, S, D = support.shape
    out = support.new_empty(T, n_way, D)
    if out.numel() == 0:
        return out
    block_n = _block_n(n_way)
    grid = (T, triton.cdiv(n_way, block_n), triton.cdiv(D, BLOCK_D))
    _forward_kernel[grid](
        support, labels, out, S, n_way, D,
        ACC=_acc_dtype(support.dtype), BLOCK_S=BLOCK_S, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
    )
    return out


def backward(grad: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """``grad_support: [T, S, D]`` from ``grad: [T, n_way, D]`` and ``labels: [T, S]``."""
    grad, labels = grad.contiguous(), labels.contiguous()
    (T, S), D = labels.shape, grad.shape[2]
    out = grad.new_empty(T, S, D)
    if out.numel() == 0:
        return out
    grid = (T, triton.cdiv(S, BLOCK_S), triton.cdiv(D, BLOCK_D))
    _backward_kernel[grid](
        grad, labels, out, S, n_way, D,
        ACC=_acc_dtype(grad.dtype), BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D,
    )
    return out


def _ptx_cases() -> list[dict]:
    """Signatures compiled to PTX by tests/test_compile_kernels.py (every dtype, int64 labels)."""
    cases = []
    for dtype, acc in (("fp32", tl.float32), ("fp64", tl.float64), ("fp16", tl.float32), ("bf16", tl.float32)):
        sizes = {"S": "i32", "N": "i32", "D": "i32"}
        cases.append({
            "fn": _forward_kernel,
            "signature": {"x_ptr": f"*{dtype}", "lab_ptr": "*i64", "out_ptr": f"*{dtype}", **sizes},
            "constexprs": {"ACC": acc, "BLOCK_S": BLOCK_S, "BLOCK_N": 16, "BLOCK_D": BLOCK_D},
        })
        cases.append({
            "fn": _backward_kernel,
            "signature": {"g_ptr": f"*{dtype}", "lab_ptr": "*i64", "gx_ptr": f"*{dtype}", **sizes},
            "constexprs": {"ACC": acc, "BLOCK_S": BLOCK_S, "BLOCK_D": BLOCK_D},
        })
    return cases


PTX_CHECKS = _ptx_cases()
