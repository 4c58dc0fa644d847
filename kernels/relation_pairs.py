"""Triton kernels of ``pymeta::relation_pairs`` (Relation Network pairs: broadcast sum,
per-task BatchNorm, ReLU) and its backward. Math: ``pymeta/ops/relation_pairs.py``.

Layout (contiguous): classes ``a [T, N, C, HW]``, queries ``b [T, Q, C, HW]``, pairs
``[T, Q, N, C, HW]``; per-channel parameters ``[T, C]``.

* ``_stats_kernel``, one program per (task, channel): the batch mean and variance in
  closed form from the two sides (``var = mean_hw[var_n a + var_q b + (abar + bbar -
  mean)^2]``), reading ``a`` and ``b`` only, never the ``Q * N`` pairs.
* ``_forward_kernel``, one program per (task, query, class) pair and block of ``C * HW``:
  ``relu((a + b - mean) * invstd * w + bias)``, contiguous in all three tensors.
* ``_backward_reduce_kernel``, one program per (task, channel): one pass over the
  incoming gradient ``g`` with the ``[N, HW-block]`` tile of ``a`` in registers, giving
  ``G_n = sum_q gz``, ``H_q = sum_n gz``, ``s1 = sum gz`` and ``s2 = sum gz * xhat``
  (``gz = g [z > 0]``); ``_backward_finalize_kernel`` turns ``G`` and ``H`` into the
  gradients of ``a`` and ``b`` (train mode: minus the paths through the task's mean and
  variance). ``s2`` and ``s1`` are the gradients of the weight and bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements of C * HW per forward program
BLOCK_Q = 16  # queries per tile when reducing over Q


@triton.jit
def _stats_kernel(
    a_ptr, b_ptr, mean_ptr, var_ptr, N, Q, C, HW,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    tc = tl.program_id(0).to(tl.int64)
    t, c = tc // C, tc % C
    n = tl.arange(0, BLOCK_N)
    a_base = a_ptr + (t * N * C + c) * HW + n[:, None] * C * HW
    b_base = b_ptr + (t * Q * C + c) * HW
    # Pass 1: the mean of abar + bbar over positions.
    total = tl.zeros((BLOCK_HW,), dtype=ACC)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        a = tl.load(a_base + hw[None, :], mask=(n < N)[:, None] & hw_ok[None, :], other=0.0).to(ACC)
        bsum = tl.zeros((BLOCK_HW,), dtype=ACC)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            b = tl.load(b_base + q[:, None] * C * HW + hw[None, :], mask=(q < Q)[:, None] & hw_ok[None, :], other=0.0)
            bsum += tl.sum(b.to(ACC), axis=0)
        total += tl.sum(a, axis=0) / N + bsum / Q  # 0 at masked positions
    mean = tl.sum(total, axis=0) / HW
    # Pass 2: the variance, from each side's spread and the spread of abar + bbar.
    spread = tl.zeros((BLOCK_HW,), dtype=ACC)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        a_mask = (n < N)[:, None] & hw_ok[None, :]
        a = tl.load(a_base + hw[None, :], mask=a_mask, other=0.0).to(ACC)
        abar = tl.sum(a, axis=0) / N
        da = tl.where(a_mask, a - abar[None, :], 0.0)
        bsum = tl.zeros((BLOCK_HW,), dtype=ACC)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            b = tl.load(b_base + q[:, None] * C * HW + hw[None, :], mask=(q < Q)[:, None] & hw_ok[None, :], other=0.0)
            bsum += tl.sum(b.to(ACC), axis=0)
        bbar = bsum / Q
        db2 = tl.zeros((BLOCK_HW,), dtype=ACC)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            b_mask = (q < Q)[:, None] & hw_ok[None, :]
            b = tl.load(b_base + q[:, None] * C * HW + hw[None, :], mask=b_mask, other=0.0).to(ACC)
            db = tl.where(b_mask, b - bbar[None, :], 0.0)
            db2 += tl.sum(db * db, axis=0)
        d = tl.where(hw_ok, abar + bbar - mean, 0.0)
        spread += tl.sum(da * da, axis=0) / N + db2 / Q + d * d
    tl.store(mean_ptr + tc, mean)
    tl.store(var_ptr + tc, tl.sum(spread, axis=0) / HW)


@triton.jit
def _forward_kernel(
    a_ptr, b_ptr, w_ptr, bias_ptr, mean_ptr, invstd_ptr, out_ptr, N, Q, C, HW,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)  # (t * Q + q) * N + n
    t, q, n = pair // (Q * N), pair // N % Q, pair % N
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < C * HW
    tc = t * C + i // HW
    a = tl.load(a_ptr + (t * N + n) * C * HW + i, mask=ok, other=0.0).to(ACC)
    b = tl.load(b_ptr + (t * Q + q) * C * HW + i, mask=ok, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + tc, mask=ok, other=0.0)
    invstd = tl.load(invstd_ptr + tc, mask=ok, other=0.0)
    w = tl.load(w_ptr + tc, mask=ok, other=0.0).to(ACC)
    beta = tl.load(bias_ptr + tc, mask=ok, other=0.0).to(ACC)
    z = (a + b - mean) * invstd * w + beta  # the backward recomputes z in this order
    tl.store(out_ptr + pair * C * HW + i, tl.maximum(z, 0.0).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_reduce_kernel(
    g_ptr, a_ptr, b_ptr, w_ptr, bias_ptr, mean_ptr, invstd_ptr, G_ptr, H_ptr, s1_ptr, s2_ptr, N, Q, C, HW,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    tc = tl.program_id(0).to(tl.int64)
    t, c = tc // C, tc % C
    mean, invstd = tl.load(mean_ptr + tc), tl.load(invstd_ptr + tc)
    w, beta = tl.load(w_ptr + tc).to(ACC), tl.load(bias_ptr + tc).to(ACC)
    n = tl.arange(0, BLOCK_N)
    a_off = (t * N * C + c) * HW + n[:, None] * C * HW  # a[t, n, c, :] and G[t, n, c, :]
    acc1 = tl.zeros((BLOCK_HW,), dtype=ACC)
    acc2 = tl.zeros((BLOCK_HW,), dtype=ACC)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        mask = (n < N)[:, None] & hw_ok[None, :]
        a = tl.load(a_ptr + a_off + hw[None, :], mask=mask, other=0.0).to(ACC)
        G = tl.zeros((BLOCK_N, BLOCK_HW), dtype=ACC)
        for q in range(0, Q):
            b = tl.load(b_ptr + ((t * Q + q) * C + c) * HW + hw, mask=hw_ok, other=0.0).to(ACC)
            g_off = ((t * Q + q) * N * C + c) * HW + n[:, None] * C * HW + hw[None, :]
            g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(ACC)
            xhat = (a + b[None, :] - mean) * invstd
            gz = tl.where(mask & (xhat * w + beta > 0), g, 0.0)
            G += gz
            tl.store(H_ptr + ((t * Q + q) * C + c) * HW + hw, tl.sum(gz, axis=0), mask=hw_ok)
            acc1 += tl.sum(gz, axis=0)
            acc2 += tl.sum(gz * xhat, axis=0)
        tl.store(G_ptr + a_off + hw[None, :], G, mask=mask)
    tl.store(s1_ptr + tc, tl.sum(acc1, axis=0))
    tl.store(s2_ptr + tc, tl.sum(acc2, axis=0))


@triton.jit
def _backward_finalize_kernel(
    a_ptr, b_ptr, w_ptr, mean_ptr, invstd_ptr, G_ptr, H_ptr, s1_ptr, s2_ptr, ga_ptr, gb_ptr, N, Q, C, HW,
    ACC: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    tc = tl.program_id(0).to(tl.int64)
    t, c = tc // C, tc % C
    mean, invstd = tl.load(mean_ptr + tc), tl.load(invstd_ptr + tc)
    k = tl.load(w_ptr + tc).to(ACC) * invstd
    M = Q * N * HW
    mu1, mu2 = tl.load(s1_ptr + tc) / M, tl.load(s2_ptr + tc) / M
    n = tl.arange(0, BLOCK_N)
    a_off = (t * N * C + c) * HW + n[:, None] * C * HW
    b_base = (t * Q * C + c) * HW
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        a_mask = (n < N)[:, None] & hw_ok[None, :]
        G = tl.load(G_ptr + a_off + hw[None, :], mask=a_mask, other=0.0)
        if BATCH_STATS:  # minus the gradient through the task's mean and variance
            a = tl.load(a_ptr + a_off + hw[None, :], mask=a_mask, other=0.0).to(ACC)
            asum = tl.sum(a, axis=0)
            bsum = tl.zeros((BLOCK_HW,), dtype=ACC)
            for q0 in range(0, Q, BLOCK_Q):
                q = q0 + tl.arange(0, BLOCK_Q)
                b = tl.load(b_ptr + b_base + q[:, None] * C * HW + hw[None, :],
                            mask=(q < Q)[:, None] & hw_ok[None, :], other=0.0)
                bsum += tl.sum(b.to(ACC), axis=0)
            xhat_q = invstd * (Q * (a - mean) + bsum[None, :])  # sum_q xhat[q, n]
            G = G - Q * mu1 - mu2 * xhat_q
        tl.store(ga_ptr + a_off + hw[None, :], (k * G).to(ga_ptr.dtype.element_ty), mask=a_mask)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            b_mask = (q < Q)[:, None] & hw_ok[None, :]
            b_off = b_base + q[:, None] * C * HW + hw[None, :]
            H = tl.load(H_ptr + b_off, mask=b_mask, other=0.0)
            if BATCH_STATS:
                b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0).to(ACC)
                xhat_n = invstd * (asum[None, :] + N * (b - mean))  # sum_n xhat[q, n]
                H = H - N * mu1 - mu2 * xhat_n
            tl.store(gb_ptr + b_off, (k * H).to(gb_ptr.dtype.element_ty), mask=b_mask)


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _blocks(N: int, HW: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_HW)``: all N classes in one tile, up to 2048 elements a tile."""
    block_n = max(2, triton.next_power_of_2(N))
    return block_n, max(16, min(triton.next_power_of_2(HW), 2048 // block_n))


def _statistics(
    a: Tensor, b: Tensor, running_mean: Tensor | None, running_var: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(mean, invstd)`` ``[T * C]`` in the accumulation dtype (batch or running statistics)."""
    acc, acc_tl = _acc(a.dtype)
    T, N, C = a.shape[:3]
    if running_mean is not None:
        mean, var = running_mean.to(acc).reshape(-1), running_var.to(acc).reshape(-1)
    else:
        mean, var = a.new_empty(T * C, dtype=acc), a.new_empty(T * C, dtype=acc)
        block_n, block_hw = _blocks(N, a[0, 0, 0].numel())
        _stats_kernel[(T * C,)](a, b, mean, var, N, b.shape[1], C, a[0, 0, 0].numel(),
                                ACC=acc_tl, BLOCK_N=block_n, BLOCK_Q=BLOCK_Q, BLOCK_HW=block_hw)
    return mean, torch.rsqrt(var + eps)  # eps added here: exact in float64, as the reference


def forward(classes: Tensor, queries: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None,
            running_var: Tensor | None, eps: float) -> Tensor:
    """Pair activations ``[T, Q, N, C, H, W]`` of ``classes [T, N, C, H, W]`` and ``queries [T, Q, C, H, W]``."""
    a, b = classes.contiguous(), queries.contiguous()
    (T, N, C), Q, HW = a.shape[:3], b.shape[1], a.shape[3] * a.shape[4]
    out = a.new_empty(T, Q, N, *a.shape[2:])
    if out.numel() == 0:
        return out
    mean, invstd = _statistics(a, b, running_mean, running_var, eps)
    grid = (T * Q * N, triton.cdiv(C * HW, BLOCK))
    _forward_kernel[grid](a, b, weight.contiguous(), bias.contiguous(), mean, invstd, out, N, Q, C, HW,
                          ACC=_acc(a.dtype)[1], BLOCK=BLOCK)
    return out


def backward(grad: Tensor, classes: Tensor, queries: Tensor, weight: Tensor, bias: Tensor,
             running_mean: Tensor | None, running_var: Tensor | None, eps: float
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(classes, queries, weight [T, C], bias [T, C])`` from ``grad [T, Q, N, C, H, W]``."""
    a, b, g = classes.contiguous(), queries.contiguous(), grad.to(classes.dtype).contiguous()
    (T, N, C), Q, HW = a.shape[:3], b.shape[1], a.shape[3] * a.shape[4]
    acc, acc_tl = _acc(a.dtype)
    ga, gb = torch.zeros_like(a), torch.zeros_like(b)
    s1, s2 = a.new_zeros(T * C, dtype=acc), a.new_zeros(T * C, dtype=acc)
    if g.numel() > 0:
        mean, invstd = _statistics(a, b, running_mean, running_var, eps)
        w = weight.contiguous()
        G, H = a.new_empty(a.shape, dtype=acc), b.new_empty(b.shape, dtype=acc)  # sums of gz in ACC
        block_n, block_hw = _blocks(N, HW)
        _backward_reduce_kernel[(T * C,)](g, a, b, w, bias.contiguous(), mean, invstd, G, H, s1, s2, N, Q, C, HW,
                                          ACC=acc_tl, BLOCK_N=block_n, BLOCK_HW=block_hw)
        _backward_finalize_kernel[(T * C,)](a, b, w, mean, invstd, G, H, s1, s2, ga, gb, N, Q, C, HW,
                                            ACC=acc_tl, BATCH_STATS=running_mean is None, BLOCK_N=block_n,
                                            BLOCK_Q=BLOCK_Q, BLOCK_HW=block_hw)
    return ga, gb, s2.view(T, C).to(weight.dtype), s1.view(T, C).to(bias.dtype)


def _ptx_cases() -> list[dict]:
    """Signatures compiled to PTX by tests/test_compile_kernels.py (every dtype, both modes)."""
    cases = []
    sizes = {"N": "i32", "Q": "i32", "C": "i32", "HW": "i32"}
    for dtype, acc in (("fp32", tl.float32), ("fp64", tl.float64), ("fp16", tl.float32), ("bf16", tl.float32)):
        acc_name = "fp64" if acc == tl.float64 else "fp32"
        blocks = {"BLOCK_N": 8, "BLOCK_HW": 32}
        cases.append({
            "fn": _stats_kernel,
            "signature": {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "mean_ptr": f"*{acc_name}",
                          "var_ptr": f"*{acc_name}", **sizes},
            "constexprs": {"ACC": acc, "BLOCK_Q": BLOCK_Q, **blocks},
        })
        cases.append({
            "fn": _forward_kernel,
            "signature": {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
                          "mean_ptr": f"*{acc_name}", "invstd_ptr": f"*{acc_name}", "out_ptr": f"*{dtype}", **sizes},
            "constexprs": {"ACC": acc, "BLOCK": BLOCK},
        })
        cases.append({
            "fn": _backward_reduce_kernel,
            "signature": {"g_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
                          "bias_ptr": f"*{dtype}", "mean_ptr": f"*{acc_name}", "invstd_ptr": f"*{acc_name}",
                          "G_ptr": f"*{acc_name}", "H_ptr": f"*{acc_name}", "s1_ptr": f"*{acc_name}",
                          "s2_ptr": f"*{acc_name}", **sizes},
            "constexprs": {"ACC": acc, **blocks},
        })
        for batch_stats in (True, False):
            cases.append({
                "fn": _backward_finalize_kernel,
                "signature": {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
                              "mean_ptr": f"*{acc_name}", "invstd_ptr": f"*{acc_name}", "G_ptr": f"*{acc_name}",
                              "H_ptr": f"*{acc_name}", "s1_ptr": f"*{acc_name}", "s2_ptr": f"*{acc_name}",
                              "ga_ptr": f"*{dtype}", "gb_ptr": f"*{dtype}", **sizes},
                "constexprs": {"ACC": acc, "BATCH_STATS": batch_stats, "BLOCK_Q": BLOCK_Q, **blocks},
            })
    return cases


PTX_CHECKS = _ptx_cases()
