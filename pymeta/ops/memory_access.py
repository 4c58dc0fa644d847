"""MANN memory access: one time step's least-recently-used write and content-based reads.

``memory_access(memory, usage, read_weights, keys, adds, gates, gamma)`` does, for all T
tasks and H heads at once (Santoro et al. 2016, "One-shot Learning with
Memory-Augmented Neural Networks", section 3.1; the order of operations and the cosine
formula follow the reference implementation tristandeleu/ntm-one-shot, mann/model.py)::

    lu      = the H least-used rows of usage               [T, H]  (lu[:, 0]: the least used)
    ww[h]   = gates[h] * read_weights[h] + (1 - gates[h]) * onehot(lu[h])     write weights
    memory' = memory with row lu[:, 0] zeroed + sum_h ww[h]^T adds[h]         [T, R, W]
    sim     = keys . memory'_i / sqrt(|keys|^2 |memory'_i|^2 + eps)           [T, H, R]
    read_weights' = softmax over the rows of sim                              [T, H, R]
    reads   = read_weights' @ memory'                                         [T, H, W]
    usage'  = gamma * usage + sum_h read_weights'[h] + sum_h ww[h]            [T, R]

Head ``h`` writes (through its least-used share) to the ``h``-th least-used row, as the
reference implementation does (``argsort(usage)[:, :H]``); the paper's ``w^lu`` marks the
same H rows. The reads use the memory after the write.

Least-used selection is a discrete choice: the gradient w.r.t. ``usage`` flows only
through ``gamma * usage``, never through which rows were chosen. Ties are broken by the
lowest row index (the first H entries of a *stable* ascending sort of ``usage``), in
every backend, so all backends choose the same rows; fresh memories have many exact
ties (every untouched row has the same usage). Usages that differ only by rounding can
still be ordered differently by backends that round differently, as with any argmin.

The op is the custom op ``pymeta::memory_access`` with the fused backward op
``pymeta::memory_access_backward``, both made by :class:`pymeta.ops._factory.FusedOp`
from the references below. Kernels:
``csrc/memory_access.cpp`` (CPU), ``csrc/memory_access.cu`` (CUDA) and
``kernels/memory_access.py`` (Triton); all take the op's own arguments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.ops._factory import FusedOp

EPS = 1e-6  # inside the cosine's square root, as ntm-one-shot's cosine_similarity
# The Triton kernel keeps a task's memory tile and the [R, R] comparison that ranks its rows
# in registers: up to this many elements each (R, W rounded up to powers of two, at least
# 16); larger memories run on another backend.
TRITON_MAX_TILE = 1 << 14


class MemoryState(NamedTuple):
    """What :func:`memory_access` returns: the step's reads and the new memory state."""

    reads: Tensor  # [T, H, W]
    read_weights: Tensor  # [T, H, R]
    memory: Tensor  # [T, R, W]
    usage: Tensor  # [T, R]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def least_used(usage: Tensor, heads: int) -> Tensor:
    """``[T, heads]`` int64: the ``heads`` rows of smallest usage, ascending, ties to the lowest index."""
    return torch.sort(usage, dim=-1, stable=True).indices[..., :heads].contiguous()


def _write_weights(read_weights: Tensor, gates: Tensor, lu: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(ww [T, H, R], onehot(lu) [T, H, R])`` in ``acc``."""
    rows = torch.arange(read_weights.shape[-1], device=lu.device)
    one_hot = (lu.unsqueeze(-1) == rows).to(acc)
    g = gates.to(acc).unsqueeze(-1)
    return g * read_weights.to(acc) + (1 - g) * one_hot, one_hot


def _cosine(keys: Tensor, memory: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sim, norm, |keys|^2, |memory|^2)``: ``sim = keys.m / norm`` ``[T, H, R]``."""
    kk = (keys * keys).sum(-1)
    mm = (memory * memory).sum(-1)
    norm = torch.sqrt(kk.unsqueeze(-1) * mm.unsqueeze(-2) + eps)
    return torch.bmm(keys, memory.mT) / norm, norm, kk, mm


def reference_forward(
    memory: Tensor, usage: Tensor, read_weights: Tensor, keys: Tensor, adds: Tensor, gates: Tensor,
    gamma: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pure PyTorch step: ``(reads, read_weights', memory', usage', least_used [T, H] int64)``.

    Shapes: ``memory [T, R, W]``, ``usage [T, R]``, ``read_weights [T, H, R]`` (the previous
    step's), ``keys, adds [T, H, W]``, ``gates [T, H]`` in [0, 1]. Differentiable torch ops
    throughout: it is also the composite formulation the fused op is tested against.
    """
    acc = _acc(memory.dtype)
    lu = least_used(usage, keys.shape[1])
    ww, one_hot = _write_weights(read_weights, gates, lu, acc)
    keep = (1 - one_hot[:, 0]).unsqueeze(-1)  # the least-used row is zeroed before the write
    new_memory = memory.to(acc) * keep + torch.bmm(ww.mT, adds.to(acc))
    sim = _cosine(keys.to(acc), new_memory, eps)[0]
    weights = torch.softmax(sim, dim=-1)
    reads = torch.bmm(weights, new_memory)
    new_usage = gamma * usage.to(acc) + weights.sum(1) + ww.sum(1)
    dtype = memory.dtype
    return reads.to(dtype), weights.to(dtype), new_memory.to(dtype), new_usage.to(dtype), lu


def reference_backward(
    grad_reads: Tensor, grad_read_weights: Tensor, grad_memory: Tensor, grad_usage: Tensor,
    read_weights: Tensor, keys: Tensor, adds: Tensor, gates: Tensor,
    new_read_weights: Tensor, new_memory: Tensor, least_used: Tensor, gamma: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. ``(memory, usage, read_weights, keys, adds, gates)``.

    ``grad_*`` are the incoming gradients of the four outputs; ``new_read_weights``,
    ``new_memory`` and ``least_used`` are the forward's outputs (the old memory is not
    needed: the new one is linear in it). Differentiable torch ops, so it is also the
    backward of a ``create_graph=True`` pass.
    """
    acc = _acc(new_memory.dtype)
    gr, gw, gm, gu = (g.to(acc) for g in (grad_reads, grad_read_weights, grad_memory, grad_usage))
    k, a, m, w = keys.to(acc), adds.to(acc), new_memory.to(acc), new_read_weights.to(acc)
    ww, one_hot = _write_weights(read_weights, gates, least_used, acc)
    sim, norm, kk, mm = _cosine(k, m, eps)
    # read_weights' feeds the reads and the usage besides being an output.
    g_weights = gw + gu.unsqueeze(1) + torch.bmm(gr, m.mT)
    g_sim = w * (g_weights - (w * g_weights).sum(-1, keepdim=True))  # softmax
    # d sim / d k = m / norm - sim |m|^2 k / norm^2 (and symmetrically for m).
    c = g_sim / norm
    e = g_sim * sim / (norm * norm)
    g_keys = torch.bmm(c, m) - k * (e * mm.unsqueeze(1)).sum(-1, keepdim=True)
    g_new_memory = gm + torch.bmm(w.mT, gr) + torch.bmm(c.mT, k) - m * (e * kk.unsqueeze(-1)).sum(1).unsqueeze(-1)
    g_ww = torch.bmm(a, g_new_memory.mT) + gu.unsqueeze(1)
    g_adds = torch.bmm(ww, g_new_memory)
    g_memory = g_new_memory * (1 - one_hot[:, 0]).unsqueeze(-1)
    g = gates.to(acc).unsqueeze(-1)
    g_read_weights = g * g_ww
    g_gates = (g_ww * (read_weights.to(acc) - one_hot)).sum(-1)
    grads = (g_memory, gamma * gu, g_read_weights, g_keys, g_adds, g_gates)
    return tuple(x.to(new_memory.dtype) for x in grads)  # type: ignore[return-value]


def not_supported(backend: str, memory: Tensor) -> str | None:
    """Why the forward kernel of ``backend`` cannot take a memory of this size (None: it can)."""
    if backend == "triton":
        from triton import next_power_of_2

        rows, width = (max(16, next_power_of_2(n)) for n in memory.shape[1:])
        tile = rows * max(rows, width)
        if tile > TRITON_MAX_TILE:
            return (f"the Triton kernel holds a task's [R, W] memory and [R, R] row ranks in registers: "
                    f"{rows} x {max(rows, width)} = {tile} elements > {TRITON_MAX_TILE} (R={memory.shape[1]}, "
                    f"W={memory.shape[2]})")
    return None


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _, _, read_weights, keys, adds, gates, ctx.gamma, ctx.eps = inputs
    _, new_read_weights, new_memory, _, lu = output
    ctx.mark_non_differentiable(lu)
    ctx.save_for_backward(read_weights, keys, adds, gates, new_read_weights, new_memory, lu)


def _vjp(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
    return (*_OP.backward(*grads[:4], *ctx.saved_tensors, ctx.gamma, ctx.eps), None, None)


def _fake(memory: Tensor, usage: Tensor, read_weights: Tensor, keys: Tensor, *_: Any) -> tuple[Tensor, ...]:
    T, H = keys.shape[:2]
    return (keys.new_empty(keys.shape), read_weights.new_empty(read_weights.shape), memory.new_empty(memory.shape),
            usage.new_empty(usage.shape), keys.new_empty(T, H, dtype=torch.int64))


def _backward_fake(grad_reads: Tensor, grad_read_weights: Tensor, grad_memory: Tensor, grad_usage: Tensor,
                   read_weights: Tensor, keys: Tensor, adds: Tensor, gates: Tensor, new_read_weights: Tensor,
                   new_memory: Tensor, *_: Any) -> tuple[Tensor, ...]:
    return tuple(t.new_empty(t.shape) for t in (new_memory, grad_usage, read_weights, keys, adds, gates))


_OP = FusedOp(
    "memory_access", reference_forward, fake=_fake,
    backward=reference_backward, backward_fake=_backward_fake,
    setup_context=_setup_context, vjp=_vjp,
    not_supported=lambda backend, memory, *_: not_supported(backend, memory),
    # The backward kernels hold the same tiles; the new memory is its argument 9.
    backward_not_supported=lambda backend, *args: not_supported(backend, args[9]),
    fold_tasks=True,
)


def composite(
    memory: Tensor, usage: Tensor, read_weights: Tensor, keys: Tensor, adds: Tensor, gates: Tensor,
    gamma: float = 0.95,
) -> MemoryState:
    """:func:`memory_access` as composite PyTorch ops (autograd through each; inputs unchecked):
    the reference the fused op is tested and benchmarked against."""
    return MemoryState(*reference_forward(memory, usage, read_weights, keys, adds, gates, gamma, EPS)[:4])


def memory_access(
    memory: Tensor, usage: Tensor, read_weights: Tensor, keys: Tensor, adds: Tensor, gates: Tensor,
    gamma: float = 0.95,
) -> MemoryState:
    """One MANN memory step for T tasks and H heads: LRU write, then cosine reads.

    Args:
        memory: ``[T, R, W]`` memory before the step (R rows of width W).
        usage: ``[T, R]`` usage weights before the step.
        read_weights: ``[T, H, R]`` the previous step's read weights.
        keys: ``[T, H, W]`` read keys; adds: ``[T, H, W]`` the vectors written.
        gates: ``[T, H]`` in [0, 1]: each head's share of its previous read location
            (the rest goes to its least-used row).
        gamma: usage decay.

    Returns:
        :class:`MemoryState` ``(reads [T, H, W], read_weights [T, H, R], memory [T, R, W],
        usage [T, R])``, differentiable w.r.t. every input except through the choice of the
        least-used rows, to any order. See the module docstring for the formulas.
    """
    names = ("memory", "usage", "read_weights", "keys", "adds", "gates")
    tensors = dict(zip(names, (memory, usage, read_weights, keys, adds, gates), strict=True))
    for name, t in tensors.items():
        _validate.floating(name, t)
        _validate.same_dtype(("memory", name), memory, t)
    _validate.same_device(tensors)
    for name, layout in zip(names, ("[T, R, W]", "[T, R]", "[T, H, R]", "[T, H, W]", "[T, H, W]", "[T, H]"), strict=True):
        _validate.ndim(name, tensors[name], layout.count(",") + 1, layout)
    T, R, W = memory.shape
    H = keys.shape[1]
    expected = {"usage": (T, R), "read_weights": (T, H, R), "keys": (T, H, W), "adds": (T, H, W), "gates": (T, H)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (T={T}, H={H} heads from keys, R={R}, W={W} from "
                             f"memory), got {list(tensors[name].shape)}")
    if not 1 <= H <= R or W < 1:
        raise ValueError(f"memory_access needs 1 <= H <= R and W >= 1 (each head writes to its own least-used row), "
                         f"got H={H} heads, R={R} rows, W={W}")
    gamma = _validate.positive_float("gamma", gamma, allow_zero=True)
    return MemoryState(*_OP(memory, usage, read_weights, keys, adds, gates, gamma, EPS)[:4])
