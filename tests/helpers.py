"""Shared builders for the algorithm tests: small float64 models and episodes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pymeta.ops._backends import unavailable_reason

# Tests of the C++ kernels themselves (the op-case tests skip per backend in op_cases.py).
needs_cpp = pytest.mark.skipif(unavailable_reason("cpp", torch.device("cpu")) is not None,
                               reason="the C++ extension did not build")


def mlp(in_features: int = 1, out_features: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, out_features))


def mlp_norms() -> nn.Module:
    """An MLP with affine LayerNorm and BatchNorm1d, the other vmap trap."""
    return nn.Sequential(
        nn.Linear(1, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1)
    )


def conv_bn(n_way: int = 4) -> nn.Module:
    """A small conv net with BatchNorm: the case where vmap over torch.func.grad gives wrong
    second-order gradients (pytorch/functorch issue 534; see pymeta/core/norms.py)."""
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


def cluster_episode(
    tasks: int = 4, ways: int = 3, shots: int = 4, queries: int = 5, dim: int = 8
) -> tuple[Tensor, ...]:
    """Separable few-shot tasks: each task draws its own class centres, examples are
    centre + noise. ``x: [T, S, dim]`` float64, ``y: [T, S]`` labels ``0..ways-1``."""
    centres = 2 * torch.randn(tasks, ways, dim, dtype=torch.float64)
    task = torch.arange(tasks)[:, None]
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    sx = centres[task, sy] + 0.5 * torch.randn(tasks, ways * shots, dim, dtype=torch.float64)
    qx = centres[task, qy] + 0.5 * torch.randn(tasks, ways * queries, dim, dtype=torch.float64)
    return sx, sy, qx, qy


def run(model: nn.Module, weights: dict[str, Tensor], x: Tensor) -> Tensor:
    """``model`` with ``weights`` on one batch; BatchNorm runs natively in training mode
    (batch statistics) on copies of the buffers, so running statistics are never touched:
    pymeta's episode policy."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**weights, **buffers}, (x,))


def reference_adapt(
    model: nn.Module,
    weights: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn,
    lr: float | dict[str, Tensor],
    steps: int,
    first_order: bool = False,
    adapt: list[str] | None = None,
) -> dict[str, Tensor]:
    """One task's ``weights`` after ``steps`` SGD steps on ``(x, y)``, one explicit
    ``autograd.grad(create_graph=not first_order)`` per step; ``lr`` per weight name
    (Meta-SGD) or one float."""
    fast = dict(weights)
    adapt = list(fast) if adapt is None else adapt
    for _ in range(steps):
        loss = loss_fn(run(model, fast, x), y)
        grads = torch.autograd.grad(loss, [fast[n] for n in adapt], create_graph=not first_order)
        for n, g in zip(adapt, grads, strict=True):
            rate = lr[n] if isinstance(lr, dict) else lr
            fast[n] = fast[n] - rate * g
    return fast


def reference_meta_grads(
    model: nn.Module,
    episode: tuple[Tensor, ...],
    loss_fn,
    lr: float | dict[str, Tensor],
    steps: int,
    first_order: bool = False,
    adapt: list[str] | None = None,
    features: nn.Module | None = None,
    also: Sequence[Tensor] = (),
) -> list[Tensor]:
    """Meta-gradient by an explicit per-task loop of ``autograd.grad(create_graph=True)``.

    With ``features`` (ANIL), each task's support and query examples first go through
    ``features`` together and ``model`` is the adapted head. Returns the gradients of
    ``model``'s parameters, then ``features``', then of the tensors in ``also``.
    """
    sx, sy, qx, qy = episode
    params = dict(model.named_parameters())
    wrt = [*params.values(), *(features.parameters() if features is not None else ()), *also]
    meta_loss = 0.0
    for t in range(sx.shape[0]):
        xs, xq = sx[t], qx[t]
        if features is not None:
            z = run(features, dict(features.named_parameters()), torch.cat([xs, xq]))
            xs, xq = z[: len(xs)], z[len(xs) :]
        fast = reference_adapt(model, params, xs, sy[t], loss_fn, lr, steps, first_order, adapt)
        meta_loss = meta_loss + loss_fn(run(model, fast, xq), qy[t])
    return list(torch.autograd.grad(meta_loss, wrt, allow_unused=True))


def per_task_sum(loss_fn, pred: Tensor, target: Tensor) -> Tensor:
    """Sum over tasks of each task's mean loss: the meta-loss the references use."""
    return sum(loss_fn(p, y) for p, y in zip(pred, target, strict=True))


def relative_error(actual: list[Tensor], expected: list[Tensor]) -> float:
    a = torch.cat([x.reshape(-1) for x in actual])
    e = torch.cat([x.reshape(-1) for x in expected])
    return ((a - e).norm() / e.norm()).item()


__all__ = ["F"]


def conv_maps(channels: int = 4) -> nn.Module:
    """A conv encoder with BatchNorm returning feature maps: ``[B, 1, 8, 8] -> [B, channels, 4, 4]``."""
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2))


def with_running_stats(module: nn.Module, seed: int = 7) -> nn.Module:
    """``module`` with every BatchNorm's running statistics set far from 0 / 1 (and from the
    batch statistics of the test episodes), so normalising with the wrong ones shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=m.running_var.dtype) * 3 + 0.2)
    return module


def easyfsl_methods():
    """``easyfsl.methods`` (the peer used as a test oracle), or skip the test saying why."""
    import pytest

    try:
        import easyfsl.methods
    except Exception as exc:  # not installed, or its torchvision import fails
        pytest.skip(f"easyfsl is not importable ({type(exc).__name__}: {exc}); pip install 'pymeta[peers]'")
    return easyfsl.methods


def parameter_grads(loss: Tensor, module: nn.Module) -> dict[str, Tensor]:
    """``{name: d loss / d param}`` for every parameter of ``module`` (zeros where unused)."""
    named = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named.items(), grads, strict=True)}
