"""ProtoNet logits: negative distances (or cosine similarities) from queries to prototypes.

``proto_logits(query: [T, Q, D], protos: [T, N, D], metric) -> [T, Q, N]`` for
``metric`` in

* ``"sqeuclidean"``: ``-||q - p||^2`` (the ProtoNet paper),
* ``"euclidean"``: ``-||q - p||`` (easyfsl's ``PrototypicalNetworks``, ``torch.cdist``),
* ``"cosine"``: ``q.p / (max(||q||, eps) max(||p||, eps))``.

No backend materialises the ``[T, Q, N, D]`` difference tensor. The reference and Triton
use ``||q||^2 + ||p||^2 - 2 q.p`` with one matmul after centring both sides on a point
of the task (the mean, resp. the first prototype): distances are translation invariant,
and without centring the expansion cancels catastrophically when the features share a
large offset (float32 error ~ eps * ||q||^2, not eps * ||q - p||^2). The C++ and CUDA
kernels sum the differences directly, which is exact to rounding and as fast on CPU.
Squared distances are clamped at 0, the Euclidean gradient at distance 0 is 0 (not
NaN), and cosine clamps the norms at ``EPS``.

The op is the custom op ``pymeta::proto_logits(query, protos, metric, eps)`` (the metric
as its index in :data:`METRICS`) with a fused backward op ``pymeta::proto_logits_backward``,
both made by :class:`pymeta.ops._factory.FusedOp` from the references below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.ops._factory import FusedOp

METRICS = ("sqeuclidean", "euclidean", "cosine")
# The op (and so every backend) takes the metric as its index in METRICS.
SQEUCLIDEAN, EUCLIDEAN, COSINE = range(len(METRICS))
EPS = 1e-8  # cosine: norms below EPS are clamped so a zero vector has similarity 0, not NaN


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def reference_forward(query: Tensor, protos: Tensor, metric: int, eps: float) -> Tensor:
    """Pure PyTorch ``[T, Q, N]`` logits of ``query: [T, Q, D]`` against ``protos: [T, N, D]``.

    ``metric``: index in :data:`METRICS`; ``eps``: the cosine norm clamp (:data:`EPS`).
    """
    acc = _acc(query.dtype)
    q, p = query.to(acc), protos.to(acc)
    if metric == COSINE:
        q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(eps)
        p = p / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(eps)
        return torch.bmm(q, p.mT).to(query.dtype)
    centre = p.mean(dim=1, keepdim=True)
    q, p = q - centre, p - centre
    norms = (q * q).sum(-1, keepdim=True) + (p * p).sum(-1).unsqueeze(1)
    sq = torch.baddbmm(norms, q, p.mT, alpha=-2).clamp_min_(0)
    return (sq.neg_() if metric == SQEUCLIDEAN else sq.sqrt_().neg_()).to(query.dtype)


def reference_backward(
    grad: Tensor, query: Tensor, protos: Tensor, logits: Tensor, metric: int, eps: float
) -> tuple[Tensor, Tensor]:
    """Gradients ``([T, Q, D], [T, N, D])`` of the logits w.r.t. ``query`` and ``protos``.

    ``grad: [T, Q, N]`` is the incoming gradient and ``logits: [T, Q, N]`` the forward's
    result. Built from differentiable torch ops, so it also serves as the backward of a
    ``create_graph=True`` pass (second-order meta-gradients differentiate through it).
    """
    acc = _acc(query.dtype)
    g, q, p, o = grad.to(acc), query.to(acc), protos.to(acc), logits.to(acc)
    if metric == COSINE:
        # d/dq [q.p rq rp] = rq rp p - out kq q, with rq = 1 / max(|q|, eps) and
        # kq = rq^2 where the norm is not clamped (the clamp's derivative is 0 there).
        nq = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        np_ = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
        rq, rp = 1 / nq.clamp_min(eps), 1 / np_.clamp_min(eps)
        kq = torch.where(nq > eps, rq * rq, 0)
        kp = torch.where(np_ > eps, rp * rp, 0)
        go = g * o
        gq = rq * torch.bmm(g * rp.mT, p) - go.sum(-1, keepdim=True) * kq * q
        gp = rp * torch.bmm((g * rq).mT, q) - go.sum(1).unsqueeze(-1) * kp * p
        return gq.to(query.dtype), gp.to(protos.dtype)
    # grad_q = sum_n a (q - p_n) and grad_p_n = -sum_q a (q - p_n), with a = g d(out)/d(q).
    if metric == SQEUCLIDEAN:
        a = -2 * g
    else:
        # out = -|q - p|: a = g / out where out < 0 and 0 at distance 0. The denominator is
        # made safe first so the unselected branch has no inf/NaN to leak into double backward.
        hit = o < 0
        a = torch.where(hit, g / torch.where(hit, o, -1), 0)
    # The sums are centred on a detached point: the result is mathematically independent of
    # it, and centring avoids cancellation between a q and a p_n for large offsets.
    centre = p.detach().mean(dim=1, keepdim=True)
    q, p = q - centre, p - centre
    gq = a.sum(-1, keepdim=True) * q - torch.bmm(a, p)
    gp = a.sum(1).unsqueeze(-1) * p - torch.bmm(a.mT, q)
    return gq.to(query.dtype), gp.to(protos.dtype)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, int, float], output: Tensor) -> None:
    query, protos, ctx.metric, ctx.eps = inputs
    ctx.save_for_backward(query, protos, output)


def _vjp(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
    query, protos, logits = ctx.saved_tensors
    return (*_OP.backward(grad, query, protos, logits, ctx.metric, ctx.eps), None, None)


_OP = FusedOp(
    "proto_logits", reference_forward,
    fake=lambda query, protos, metric, eps: query.new_empty(query.shape[0], query.shape[1], protos.shape[1]),
    backward=reference_backward,
    backward_fake=lambda grad, query, protos, logits, metric, eps: (query.new_empty(query.shape),
                                                                    protos.new_empty(protos.shape)),
    setup_context=_setup_context, vjp=_vjp,
    fold_tasks=True,
)


def proto_logits(query: Tensor, protos: Tensor, metric: str = "sqeuclidean") -> Tensor:
    """Logits ``[T, Q, N]`` of every query against every class prototype of its task.

    Args:
        query: ``[T, Q, D]`` floating-point query embeddings.
        protos: ``[T, N, D]`` class prototypes (e.g. from :func:`pymeta.ops.prototypes`).
        metric: ``"sqeuclidean"`` (``-||q - p||^2``), ``"euclidean"`` (``-||q - p||``) or
            ``"cosine"`` (cosine similarity).

    Returns:
        ``[T, Q, N]`` in the promoted dtype of ``query`` and ``protos``; differentiable
        w.r.t. both, to any order.
    """
    _validate.floating("query", query)
    _validate.floating("protos", protos)
    _validate.layouts({"query": (query, "[T, Q, D]"), "protos": (protos, "[T, N, D]")})
    _validate.same_device({"query": query, "protos": protos})
    _validate.choice("metric", metric, METRICS)
    dtype = torch.promote_types(query.dtype, protos.dtype)
    return _OP(query.to(dtype), protos.to(dtype), METRICS.index(metric), EPS)
