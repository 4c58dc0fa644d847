"""Hand-written ``torch.func`` MAML / Meta-SGD (library name ``"torch.func"``).

``vmap(query_loss, in_dims=(None, None, 0, 0, 0, 0))`` over tasks, where ``query_loss``
runs the inner loop with ``torch.func.grad(inner_loss)`` and ``functional_call``; one
``mean().backward()``. ``replace_all_batch_norm_modules_`` is applied (no running-stat
updates under vmap). Its second-order meta-gradient through BatchNorm (conv4) is *wrong*:
``vmap`` over ``grad`` through ``batch_norm`` in training mode (pytorch/functorch issue
534, open since 2022); ``bench_meta.py``'s float64 check measures it. ``compile=1`` wraps
the same meta-loss function in ``torch.compile`` (functorch transforms trace into one
graph, which AOTAutograd differentiates once).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from workloads import Problem

from peers import MetaStep, meta_step


def maml(problem: Problem, compile: int = 0) -> MetaStep:
    """vmap over tasks of a torch.func.grad inner loop on ``problem``; Meta-SGD's
    per-element lrs (``problem.algorithm == "metasgd"``) also receive meta-gradients."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    model, loss_fn, steps = problem.model, problem.loss_fn, problem.steps
    replace_all_batch_norm_modules_(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    lrs: Any = problem.lr
    if problem.algorithm == "metasgd":
        lrs = {k: nn.Parameter(torch.full_like(p, problem.lr)) for k, p in params.items()}

    def inner_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (p, buffers), (x,)), y)

    def query_loss(p: dict[str, Tensor], lrs: Any, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        fast = p
        for _ in range(steps):
            g = grad(inner_loss)(fast, sx, sy)
            if problem.first_order:
                g = {k: v.detach() for k, v in g.items()}
            rate = lrs if isinstance(lrs, dict) else dict.fromkeys(fast, lrs)
            fast = {k: fast[k] - rate[k] * g[k] for k in fast}
        return inner_loss(fast, qx, qy)

    batched = vmap(query_loss, in_dims=(None, None, 0, 0, 0, 0))

    def loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        return batched(params, lrs, sx, sy, qx, qy).mean()

    meta_params = list(params.values()) + (list(lrs.values()) if isinstance(lrs, dict) else [])
    return meta_step(meta_params, loss, problem.data, per_task=False, compile=compile)


metasgd = maml
