"""Triton kernels of ``pymeta::proto_logits`` and its fused backward.

Forward: one program per ``(task, block of queries, block of prototypes)`` walks over D in
``BLOCK_D`` slices, accumulating ``q.p`` with ``tl.dot`` and the squared norms beside it;
no ``[T, Q, N, D]`` tile ever exists. For the Euclidean metrics both sides are first
centred on the task's first prototype (distances are translation invariant), so the
expansion ``|q|^2 + |p|^2 - 2 q.p`` does not cancel catastrophically when the features
share a large offset. Everything is computed in float32 (float64 for float64 inputs);
``tl.dot`` runs in IEEE precision, because TF32 would cost 3 decimal digits.

Backward: for the Euclidean metrics ``grad_q = sum_n a (q - p_n)`` and
``grad_p_n = -sum_q a (q - p_n)``, with ``a`` the upstream gradient times d(out)/dq per
unit difference (``-2 g``, resp. ``g / out``), are matmuls of the ``[Q, N]`` weight tile
with centred feature tiles; cosine works on the raw features with the per-row norms,
computed beforehand with torch.

``METRIC`` is the index of the metric in ``pymeta.ops.proto_logits.METRICS``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_SQEUCLIDEAN, _EUCLIDEAN, _COSINE = 0, 1, 2
BLOCK_Q = 32
BLOCK_D = 64


@triton.jit
def _weights(g, o, METRIC: tl.constexpr):
    """Weight ``a`` of ``(q - p)`` in the Euclidean gradients, per (query, prototype)."""
    if METRIC == 0:
        a = -2.0 * g  # out = -s: d(out)/dq = -2 (q - p)
    else:
        # out = -|q - p|: d(out)/dq = (q - p) / out; 0 at distance 0 (and in masked lanes).
        hit = o < 0
        a = tl.where(hit, g / tl.where(hit, o, -1.0), 0.0)
    return a


@triton.jit
def _forward_kernel(
    q_ptr, p_ptr, out_ptr, Q, N, D, eps,
    METRIC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < Q, cols < N
    q_base = q_ptr + task * Q * D
    p_base = p_ptr + task * N * D
    dot = tl.zeros((BLOCK_Q, BLOCK_N), dtype=ACC)
    qq = tl.zeros((BLOCK_Q,), dtype=ACC)
    pp = tl.zeros((BLOCK_N,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        q_mask = row_ok[:, None] & d_ok[None, :]
        p_mask = col_ok[:, None] & d_ok[None, :]
        x = tl.load(q_base + rows[:, None] * D + d[None, :], mask=q_mask, other=0.0).to(ACC)
        y = tl.load(p_base + cols[:, None] * D + d[None, :], mask=p_mask, other=0.0).to(ACC)
        if METRIC != 2:
            centre = tl.load(p_base + d, mask=d_ok, other=0.0).to(ACC)
            x = tl.where(q_mask, x - centre[None, :], 0.0)
            y = tl.where(p_mask, y - centre[None, :], 0.0)
        dot += tl.dot(x, tl.trans(y), input_precision="ieee")
        qq += tl.sum(x * x, axis=1)
        pp += tl.sum(y * y, axis=1)
    if METRIC == 2:
        nq = tl.maximum(tl.sqrt(qq), eps)
        np_ = tl.maximum(tl.sqrt(pp), eps)
        out = dot / (nq[:, None] * np_[None, :])
    else:
        out = tl.maximum(qq[:, None] + pp[None, :] - 2.0 * dot, 0.0)
        if METRIC == 1:
            out = tl.sqrt(out)
        out = -out
    o_ptrs = out_ptr + task * Q * N + rows[:, None] * N + cols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_query_kernel(
    g_ptr, o_ptr, q_ptr, p_ptr, qn_ptr, pn_ptr, gq_ptr, Q, N, D, eps,
    METRIC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < Q, d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    p_base = p_ptr + task * N * D
    x = tl.load(q_ptr + task * Q * D + rows[:, None] * D + d[None, :], mask=q_mask, other=0.0)
    x = x.to(ACC)
    if METRIC == 2:
        nq = tl.load(qn_ptr + task * Q + rows, mask=row_ok, other=1.0)
        rq = 1.0 / tl.maximum(nq, eps)
        kq = tl.where(nq > eps, rq * rq, 0.0)
    else:
        centre = tl.load(p_base + d, mask=d_ok, other=0.0).to(ACC)
        x = tl.where(q_mask, x - centre[None, :], 0.0)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    row_sum = tl.zeros((BLOCK_Q,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        qn_mask = row_ok[:, None] & col_ok[None, :]
        p_mask = col_ok[:, None] & d_ok[None, :]
        qn_offs = task * Q * N + rows[:, None] * N + cols[None, :]
        g = tl.load(g_ptr + qn_offs, mask=qn_mask, other=0.0).to(ACC)
        o = tl.load(o_ptr + qn_offs, mask=qn_mask, other=0.0).to(ACC)
        y = tl.load(p_base + cols[:, None] * D + d[None, :], mask=p_mask, other=0.0).to(ACC)
        if METRIC == 2:
            np_ = tl.load(pn_ptr + task * N + cols, mask=col_ok, other=1.0)
            b = g * (rq[:, None] / tl.maximum(np_, eps)[None, :])
            acc += tl.dot(b, y, input_precision="ieee")
            row_sum += tl.sum(g * o, axis=1)
        else:
            a = _weights(g, o, METRIC)
            y = tl.where(p_mask, y - centre[None, :], 0.0)
            acc += tl.dot(a, y, input_precision="ieee")
            row_sum += tl.sum(a, axis=1)
    gq = acc - (row_sum * kq)[:, None] * x if METRIC == 2 else row_sum[:, None] * x - acc
    gq_ptrs = gq_ptr + task * Q * D + rows[:, None] * D + d[None, :]
    tl.store(gq_ptrs, gq.to(gq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _grad_protos_kernel(
    g_ptr, o_ptr, q_ptr, p_ptr, qn_ptr, pn_ptr, gp_ptr, Q, N, D, eps,
    METRIC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok, d_ok = cols < N, d < D
    p_mask = col_ok[:, None] & d_ok[None, :]
    p_base = p_ptr + task * N * D
    q_base = q_ptr + task * Q * D
    y = tl.load(p_base + cols[:, None] * D + d[None, :], mask=p_mask, other=0.0).to(ACC)
    if METRIC == 2:
        np_ = tl.load(pn_ptr + task * N + cols, mask=col_ok, other=1.0)
        rp = 1.0 / tl.maximum(np_, eps)
        kp = tl.where(np_ > eps, rp * rp, 0.0)
    else:
        centre = tl.load(p_base + d, mask=d_ok, other=0.0).to(ACC)
        y = tl.where(p_mask, y - centre[None, :], 0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    col_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    for q0 in range(0, Q, BLOCK_Q):
        rows = q0 + tl.arange(0, BLOCK_Q)
        row_ok = rows < Q
        qn_mask = row_ok[:, None] & col_ok[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]
        qn_offs = task * Q * N + rows[:, None] * N + cols[None, :]
        g = tl.load(g_ptr + qn_offs, mask=qn_mask, other=0.0).to(ACC)
        o = tl.load(o_ptr + qn_offs, mask=qn_mask, other=0.0).to(ACC)
        x = tl.load(q_base + rows[:, None] * D + d[None, :], mask=q_mask, other=0.0).to(ACC)
        if METRIC == 2:
            nq = tl.load(qn_ptr + task * Q + rows, mask=row_ok, other=1.0)
            b = g * (rp[None, :] / tl.maximum(nq, eps)[:, None])
            acc += tl.dot(tl.trans(b), x, input_precision="ieee")
            col_sum += tl.sum(g * o, axis=0)
        else:
            a = _weights(g, o, METRIC)
            x = tl.where(q_mask, x - centre[None, :], 0.0)
            acc += tl.dot(tl.trans(a), x, input_precision="ieee")
            col_sum += tl.sum(a, axis=0)
    gp = acc - (col_sum * kp)[:, None] * y if METRIC == 2 else col_sum[:, None] * y - acc
    gp_ptrs = gp_ptr + task * N * D + cols[:, None] * D + d[None, :]
    tl.store(gp_ptrs, gp.to(gp_ptr.dtype.element_ty), mask=p_mask)


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_n(n: int) -> int:
    # tl.dot needs every tile dim >= 16; past 64 prototypes, tile over N.
    return min(max(16, triton.next_power_of_2(n)), 64)


def forward(query: Tensor, protos: Tensor, metric: int, eps: float) -> Tensor:
    """Logits ``[T, Q, N]`` of ``query: [T, Q, D]`` against ``protos: [T, N, D]``."""
    query, protos = query.contiguous(), protos.contiguous()
    (T, Q, D), N = query.shape, protos.shape[1]
    out = query.new_empty(T, Q, N)
    if out.numel() == 0:
        return out
    block_n = _block_n(N)
    grid = (T, triton.cdiv(Q, BLOCK_Q), triton.cdiv(N, block_n))
    _forward_kernel[grid](
        query, protos, out, Q, N, D, eps,
        METRIC=metric, ACC=_acc_dtype(query.dtype),
        BLOCK_Q=BLOCK_Q, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
    )
    return out


def backward(
    grad: Tensor, query: Tensor, protos: Tensor, logits: Tensor, metric: int, eps: float
) -> tuple[Tensor, Tensor]:
    """Gradients ``([T, Q, D], [T, N, D])`` from ``grad`` and ``logits``, both ``[T, Q, N]``."""
    grad, query, protos, logits = (x.contiguous() for x in (grad, query, protos, logits))
    (T, Q, D), N = query.shape, protos.shape[1]
    grad_query, grad_protos = torch.empty_like(query), torch.empty_like(protos)
    if grad_query.numel() + grad_protos.numel() == 0:
        return grad_query, grad_protos
    acc = torch.promote_types(query.dtype, torch.float32)
    if metric == _COSINE:
        q_norms = torch.linalg.vector_norm(query, dim=-1, dtype=acc)
        p_norms = torch.linalg.vector_norm(protos, dim=-1, dtype=acc)
    else:  # unused by the Euclidean kernels; any tensor fills the pointer slot
        q_norms = p_norms = logits
    block_n = _block_n(N)
    args = (grad, logits, query, protos, q_norms, p_norms)
    meta = {
        "METRIC": metric, "ACC": _acc_dtype(query.dtype),
        "BLOCK_Q": BLOCK_Q, "BLOCK_N": block_n, "BLOCK_D": BLOCK_D,
    }
    if grad_query.numel():
        grid = (T, triton.cdiv(Q, BLOCK_Q), triton.cdiv(D, BLOCK_D))
        _grad_query_kernel[grid](*args, grad_query, Q, N, D, eps, **meta)
    if grad_protos.numel():
        grid = (T, triton.cdiv(N, block_n), triton.cdiv(D, BLOCK_D))
        _grad_protos_kernel[grid](*args, grad_protos, Q, N, D, eps, **meta)
    return grad_query, grad_protos


def _ptx_cases() -> list[dict]:
    """Signatures compiled to PTX by tests/test_compile_kernels.py (every metric and dtype)."""
    cases = []
    for dtype, acc in (("fp32", tl.float32), ("fp64", tl.float64), ("fp16", tl.float32), ("bf16", tl.float32)):
        for metric in (_SQEUCLIDEAN, _EUCLIDEAN, _COSINE):
            meta = {"METRIC": metric, "ACC": acc, "BLOCK_Q": BLOCK_Q, "BLOCK_N": 16, "BLOCK_D": BLOCK_D}
            sizes = {"Q": "i32", "N": "i32", "D": "i32", "eps": "fp32"}
            norm = "fp64" if dtype == "fp64" else "fp32"
            cases.append({
                "fn": _forward_kernel, "constexprs": meta,
                "signature": {"q_ptr": f"*{dtype}", "p_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **sizes},
            })
            grad_sig = {
                "g_ptr": f"*{dtype}", "o_ptr": f"*{dtype}", "q_ptr": f"*{dtype}", "p_ptr": f"*{dtype}",
                "qn_ptr": f"*{norm}", "pn_ptr": f"*{norm}",
            }
            for fn, out in ((_grad_query_kernel, "gq_ptr"), (_grad_protos_kernel, "gp_ptr")):
                cases.append({
                    "fn": fn, "constexprs": meta,
                    "signature": {**grad_sig, out: f"*{dtype}", **sizes},
                })
    return cases


PTX_CHECKS = _ptx_cases()
