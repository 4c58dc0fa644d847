"""learn2learn 0.2.0: ``MAML`` / ``MetaSGD``, as in learn2learn's examples.

Per task: ``learner = maml.clone()``, ``learner.adapt(loss)`` per inner step, then
``(query_loss / T).backward()`` (which keeps peak memory to one task's graph). Meta-SGD's
``params`` are the model's parameters followed by the learnable lrs.
"""

from __future__ import annotations

from torch import Tensor
from workloads import Problem

from peers import MetaStep, import_peer, meta_step


def maml(problem: Problem, compile: int = 0) -> MetaStep:
    """``learn2learn.algorithms.MAML`` (or ``MetaSGD``, for ``problem.algorithm ==
    "metasgd"``) on ``problem``; ``compile``: the per-task loss under ``torch.compile``."""
    l2l = import_peer("learn2learn", "learn2learn")
    cls = l2l.algorithms.MetaSGD if problem.algorithm == "metasgd" else l2l.algorithms.MAML
    wrapper = cls(problem.model, lr=problem.lr, first_order=problem.first_order)
    loss_fn = problem.loss_fn

    def task_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        learner = wrapper.clone()
        for _ in range(problem.steps):
            learner.adapt(loss_fn(learner(sx), sy))
        return loss_fn(learner(qx), qy)

    return meta_step(list(wrapper.parameters()), task_loss, problem.data, per_task=True, compile=compile)


metasgd = maml
