"""Shared builders for the algorithm tests: small float64 models and episodes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def mlp(in_features: int = 1, out_features: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, out_features))


def mlp_norms() -> nn.Module:
    """An MLP with affine LayerNorm and BatchNorm1d, the other vmap trap."""
    return nn.Sequential(
        nn.Linear(1, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1)
    )


def conv_bn(n_way: int = 4) -> nn.Module:
    """A small conv net with BatchNorm: the case vmap gets wrong (DESIGN.md, Known traps)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, n_way),
    )


def regression_episode(tasks: int = 3, shots: int = 5, queries: int = 6) -> tuple[Tensor, ...]:
    sx = torch.randn(tasks, shots, 1, dtype=torch.float64)
    qx = torch.randn(tasks, queries, 1, dtype=torch.float64)
    amp = torch.rand(tasks, 1, 1, dtype=torch.float64) + 0.5
    return sx, torch.sin(sx) * amp, qx, torch.sin(qx) * amp


def classification_episode(tasks: int = 3, ways: int = 4, shots: int = 2, queries: int = 3) -> tuple[Tensor, ...]:
    sx = torch.randn(tasks, ways * shots, 1, 8, 8, dtype=torch.float64)
    qx = torch.randn(tasks, ways * queries, 1, 8, 8, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return sx, sy, qx, qy


def reference_meta_grads(
    model: nn.Module,
    episode: tuple[Tensor, ...],
    loss_fn,
    lr: float | dict[str, Tensor],
    steps: int,
    first_order: bool = False,
    adapt: list[str] | None = None,
) -> list[Tensor]:
    """Meta-gradient by an explicit per-task loop of ``autograd.grad(create_graph=True)``.

    BatchNorm layers run natively in training mode (batch statistics) on copies of the
    buffers, so running statistics are never touched: pymeta's episode policy.
    """
    sx, sy, qx, qy = episode
    params = dict(model.named_parameters())
    adapt = list(params) if adapt is None else adapt
    meta_loss = 0.0
    for t in range(sx.shape[0]):
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        fast = dict(params)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, {**fast, **buffers}, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapt], create_graph=not first_order)
            for n, g in zip(adapt, grads, strict=True):
                rate = lr[n] if isinstance(lr, dict) else lr
                fast[n] = fast[n] - rate * g
        meta_loss = meta_loss + loss_fn(functional_call(model, {**fast, **buffers}, (qx[t],)), qy[t])
    return list(torch.autograd.grad(meta_loss, list(params.values()), allow_unused=True))


def per_task_sum(loss_fn, pred: Tensor, target: Tensor) -> Tensor:
    """Sum over tasks of each task's mean loss: the meta-loss the references use."""
    return sum(loss_fn(p, y) for p, y in zip(pred, target, strict=True))


def relative_error(actual: list[Tensor], expected: list[Tensor]) -> float:
    a = torch.cat([x.reshape(-1) for x in actual])
    e = torch.cat([x.reshape(-1) for x in expected])
    return ((a - e).norm() / e.norm()).item()


__all__ = ["F"]
