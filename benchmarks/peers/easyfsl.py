"""easyfsl 1.5.0: ``PrototypicalNetworks``, ``RelationNetworks``, ``MatchingNetworks``,
one task at a time.

Per task: ``model.process_support_set(support_x, support_y)`` (embeds the support set and
stores what the queries need: prototypes, or contextual support embeddings),
``scores = model(query_x)``, ``(loss_fn(scores, query_y) / T).backward()``. Support and
query go through the backbone in separate calls (separate BatchNorm batches).

* ProtoNet: the backbone outputs ``[N, D]`` features; scores are ``-torch.cdist``:
  negative *plain* Euclidean distances, not squared.
* RelationNet: the backbone outputs feature maps ``[N, C, H, W]``; the relation module
  scores the ``[Q * N, 2C, H, W]`` (prototype, query) pairs it builds.
* MatchingNet: full context embeddings with the problem's LSTMs; scores are
  log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from workloads import Problem

from peers import MetaStep, import_peer, meta_step


def _methods() -> Any:
    return import_peer("easyfsl", "easyfsl.methods")


def _model(problem: Problem) -> torch.nn.Module:
    return _methods().PrototypicalNetworks(problem.model)


def protonet(problem: Problem, compile: int = 0) -> MetaStep:
    """easyfsl's ProtoNet meta-step on ``problem``; ``compile``: the per-task loss under
    ``torch.compile``."""
    return _per_task(_model(problem), problem, compile)


def relationnet(problem: Problem, compile: int = 0) -> MetaStep:
    """``RelationNetworks(encoder, feature_dimension, relation_module)`` on the problem's modules."""
    m = problem.model
    model = _methods().RelationNetworks(m["encoder"], feature_dimension=problem.feature_dim,
                                        relation_module=m["relation_module"])  # fmt: skip
    return _per_task(model, problem, compile)


def matchingnet(problem: Problem, compile: int = 0) -> MetaStep:
    """``MatchingNetworks(encoder, feature_dimension, support_encoder, query_encoder)`` on
    the problem's modules (float32 only: easyfsl makes its one-hot labels float32)."""
    m = problem.model
    model = _methods().MatchingNetworks(m["encoder"], feature_dimension=problem.feature_dim,
                                        support_encoder=m["support_encoder"],
                                        query_encoder=m["query_encoder"])  # fmt: skip
    return _per_task(model, problem, compile)


def _per_task(model: torch.nn.Module, problem: Problem, compile: int) -> MetaStep:
    """``process_support_set`` then ``forward`` per task, ``(loss / T).backward()``."""

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
