"""pymeta (this library): one batched ``episode`` over all tasks, one ``backward()``.

MAML / Meta-SGD, and the metric learners ProtoNet, RelationNet and MatchingNet with
``batch_stats="separate"`` (each task's support and query images in separate BatchNorm
batches, as easyfsl's per-task loop: pymeta's default ``"joint"`` normalises them
together and computes another function).

Every step is ``pymeta.algorithms.episode_loss(learner, ...).backward()``, the loss that
``pymeta train`` uses: ``loss_fn`` of the flattened ``[T * Q, ...]`` predictions, which
with equally many queries per task is the mean over tasks of the per-task query losses,
as the per-task libraries compute it (a learner with ``task_chunk`` takes it chunk by
chunk in ``meta_loss``, one chunk's graph in memory). ``MetaStep.strategy()`` reports the
strategy ``"auto"`` settled on.

Options (the ``pymeta[...]`` library names): ``strategy`` (``"auto"`` by default, or
``lowered`` / ``vmap`` / ``loop``); ``task_chunk``; ``checkpoint_steps`` (MAML, Meta-SGD:
recompute inner steps in backward); ``cuda_graph``: the step captured once as a CUDA graph
and replayed (:class:`pymeta.CUDAGraphStep`, needs a CUDA device); ``compile``: the
function that calls ``episode_loss`` and returns the loss runs under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from workloads import Problem

from peers import MetaStep, PeerUnavailable, import_peer, meta_step


def maml(
    problem: Problem,
    *,
    strategy: str = "auto",
    task_chunk: int | None = None,
    checkpoint_steps: int = 0,
    cuda_graph: int = 0,
    compile: int = 0,
) -> MetaStep:
    """``pymeta.MAML`` (or ``MetaSGD``, for ``problem.algorithm == "metasgd"``); ``params``
    are the model's, then (Meta-SGD) the lrs: learn2learn's order."""
    pymeta = import_peer("pymeta", "pymeta")
    cls = pymeta.MetaSGD if problem.algorithm == "metasgd" else pymeta.MAML
    algo = cls(problem.model, lr=problem.lr, first_order=problem.first_order, steps=problem.steps,
               loss_fn=problem.loss_fn, strategy=strategy, checkpoint_steps=bool(checkpoint_steps),
               task_chunk=task_chunk)  # fmt: skip
    return _step(algo, problem, cuda_graph, compile)


metasgd = maml


def protonet(
    problem: Problem, *, strategy: str = "auto", task_chunk: int | None = None, cuda_graph: int = 0, compile: int = 0
) -> MetaStep:
    """``pymeta.ProtoNet(encoder, metric="euclidean", batch_stats="separate")``: the
    logits agree with easyfsl's to float32 rounding. ``strategy`` is how the encoder runs
    on all tasks."""
    return _step(_protonet(problem, strategy, task_chunk), problem, cuda_graph, compile)


def relationnet(
    problem: Problem, *, strategy: str = "auto", task_chunk: int | None = None, cuda_graph: int = 0, compile: int = 0
) -> MetaStep:
    """``pymeta.RelationNet(encoder, feature_dim, relation_module, batch_stats="separate")``
    on the problem's modules; train mode, so the relation module's BatchNorm normalises
    each task's ``Q * N`` pairs on their own, as easyfsl's per-task forward."""
    m = problem.model
    learner = _metric_learner("RelationNet", problem, strategy, task_chunk, m["encoder"], problem.feature_dim,
                              m["relation_module"])  # fmt: skip
    return _step(learner, problem, cuda_graph, compile)


def matchingnet(
    problem: Problem, *, strategy: str = "auto", task_chunk: int | None = None, cuda_graph: int = 0, compile: int = 0
) -> MetaStep:
    """``pymeta.MatchingNet(encoder, feature_dim, support_encoder, query_encoder, fce=True,
    batch_stats="separate")`` on the problem's modules (full context embeddings, batched
    over tasks: one LSTM call and S cell steps for the whole meta-batch)."""
    m = problem.model
    learner = _metric_learner("MatchingNet", problem, strategy, task_chunk, m["encoder"], problem.feature_dim,
                              m["support_encoder"], m["query_encoder"], fce=True)  # fmt: skip
    return _step(learner, problem, cuda_graph, compile)


def protonet_logits(problem: Problem) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``logits(sx, sy, qx) -> [T, Q, N]``: :func:`protonet`'s ``episode``."""
    return _protonet(problem, "auto", None).episode


def _protonet(problem: Problem, strategy: str, task_chunk: int | None) -> nn.Module:
    return _metric_learner("ProtoNet", problem, strategy, task_chunk, problem.model, metric="euclidean")


def _metric_learner(
    name: str, problem: Problem, strategy: str, task_chunk: int | None, *args: Any, **kwargs: Any
) -> nn.Module:
    """``pymeta.<name>(*args, **kwargs)`` with easyfsl's BatchNorm batches
    (``batch_stats="separate"``), the problem's ``n_way``, ``strategy`` and ``task_chunk``."""
    cls = getattr(import_peer("pymeta", "pymeta"), name)
    return cls(*args, **kwargs, batch_stats="separate", strategy=strategy, n_way=problem.n_way, task_chunk=task_chunk)


def _step(learner: nn.Module, problem: Problem, cuda_graph: int, compile: int) -> MetaStep:
    """``episode_loss(learner, ...).backward()``, eager, compiled, or replayed as a CUDA graph."""
    pymeta = import_peer("pymeta", "pymeta")
    params = list(learner.parameters())

    def strategy() -> str | None:
        return learner.strategy

    if cuda_graph:
        if compile:
            raise PeerUnavailable("pymeta[cuda_graph=1,compile=1]", "pick one of cuda_graph and compile")
        if problem.data.support_x.device.type != "cuda":
            raise PeerUnavailable("pymeta[cuda_graph=1]", "CUDA graphs need a CUDA device (--device cuda)")
        batch = problem.data
        graphed = pymeta.CUDAGraphStep(learner, batch, loss_fn=problem.loss_fn)
        return MetaStep(lambda: graphed(*batch), params, strategy)

    def loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        return pymeta.algorithms.episode_loss(learner, sx, sy, qx, qy, problem.loss_fn)

    return meta_step(params, loss, problem.data, per_task=False, compile=compile, strategy=strategy)
