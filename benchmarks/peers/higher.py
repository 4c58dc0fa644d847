"""higher 0.2.1: ``innerloop_ctx`` per task, as in higher's examples.

Per task: ``with higher.innerloop_ctx(model, SGD(lr), copy_initial_weights=False,
track_higher_grads=True) as (fmodel, diffopt)``, ``diffopt.step(loss)`` per inner step,
then ``(query_loss / T).backward()``. First order: a ``grad_callback`` that detaches the
inner gradients (higher still builds the second-order graph, then cuts it). Meta-SGD:
one SGD param group per tensor and the learnable lrs passed as ``override={"lr": lrs}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from workloads import Problem

from peers import MetaStep, import_peer, meta_step


def _detach(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.detach() for g in grads]


def maml(problem: Problem, compile: int = 0) -> MetaStep:
    """MAML (or Meta-SGD, for ``problem.algorithm == "metasgd"``) with ``higher`` on
    ``problem``; ``compile``: the per-task loss under ``torch.compile``."""
    higher = import_peer("higher", "higher")
    model, loss_fn = problem.model, problem.loss_fn
    params = list(model.parameters())
    override: dict[str, Any] | None = None
    if problem.algorithm == "metasgd":
        lrs = [nn.Parameter(torch.full_like(p, problem.lr)) for p in params]
        inner_opt = torch.optim.SGD([{"params": [p]} for p in params], lr=problem.lr)
        override, params = {"lr": lrs}, params + lrs
    else:
        inner_opt = torch.optim.SGD(params, lr=problem.lr)
    callback = _detach if problem.first_order else None

    def task_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, override=override,
                                  track_higher_grads=True) as (fmodel, diffopt):  # fmt: skip
            for _ in range(problem.steps):
                diffopt.step(loss_fn(fmodel(sx), sy), grad_callback=callback)
            return loss_fn(fmodel(qx), qy)

    return meta_step(params, task_loss, problem.data, per_task=True, compile=compile)


metasgd = maml
