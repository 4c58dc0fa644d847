"""easyfsl 1.5.0: ``PrototypicalNetworks(backbone)``, one task at a time.

Per task: ``model.process_support_set(support_x, support_y)`` (computes and stores the
prototypes), ``scores = model(query_x)`` (``-torch.cdist``: negative *plain* Euclidean
distances, not squared), ``(cross_entropy(scores, query_y) / T).backward()``. The backbone
must output ``[N, D]`` features; support and query go through it in separate calls
(separate BatchNorm batches).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from workloads import Problem

from peers import MetaStep, import_peer, meta_step


def _model(problem: Problem) -> torch.nn.Module:
    return import_peer("easyfsl", "easyfsl.methods").PrototypicalNetworks(problem.model)


def protonet(problem: Problem, compile: int = 0) -> MetaStep:
    """easyfsl's ProtoNet meta-step on ``problem``; ``compile``: the per-task loss under
    ``torch.compile``."""
    model = _model(problem)

    def task_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        model.process_support_set(sx, sy)
        return problem.loss_fn(model(qx), qy)

    return meta_step(list(model.parameters()), task_loss, problem.data, per_task=True, compile=compile)


def protonet_logits(problem: Problem) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``logits(sx, sy, qx) -> [T, Q, N]``, task by task."""
    model = _model(problem)

    def logits(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        out = []
        for t in range(sx.shape[0]):
            model.process_support_set(sx[t], sy[t])
            out.append(model(qx[t]))
        return torch.stack(out)

    return logits
