"""Prototypical Networks (Snell et al. 2017), all tasks of an episode at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _validate, _value_checks, ops
from pymeta.algorithms._metric import MetricLearner
from pymeta.algorithms.base import Learner
from pymeta.core.batched import LossFn
from pymeta.ops.proto_logits import METRICS

if TYPE_CHECKING:
    from pymeta.training import DataSpec, TrainConfig


class ProtoNet(MetricLearner, cli=("protonet",)):
    """Classify each query by its distance to the mean support embedding of each class.

    Args:
        encoder: embedding network ``[B, ...] -> [B, ...]`` (flattened to ``[B, D]``).
        metric: ``"sqeuclidean"`` (``-||q - p||^2``, the paper), ``"euclidean"``
            (``-||q - p||``, easyfsl) or ``"cosine"`` (cosine similarity), see
            :func:`pymeta.ops.proto_logits`.
        batch_stats: which examples BatchNorm in ``encoder`` takes a task's statistics
            over (inside ``episode``; without BatchNorm both give the same logits):

            * ``"joint"`` (default): the task's support and query examples together, one
              encoder batch of S + Q (the original ProtoNet code; transductive: a
              query's embedding depends on the other queries and on the support set).
            * ``"separate"``: the support examples for the support embeddings, the query
              examples for the query embeddings, two encoder batches of S and Q
              (easyfsl's ``process_support_set(support)`` then ``forward(query)``).
        strategy: how the encoder runs on all tasks when it has BatchNorm: ``"auto"``
            (time the candidates on the first episodes and keep the fastest),
            ``"vmap"``, ``"loop"`` (one encoder call per task and batch, the fastest
            for conv nets on CPU) or ``"lowered"``, as for :class:`pymeta.MAML`. All give
            the same logits and gradients. Without BatchNorm the examples of all tasks
            always run as one batch and ``strategy`` is only checked.
        n_way: the number of classes N of every episode; default: inferred per episode
            from the labels (see below). Fix it to skip that read of the labels, which
            a CUDA graph cannot capture (:class:`pymeta.CUDAGraphStep`).
        task_chunk: the default ``task_chunk`` of :meth:`meta_loss` (None: all tasks):
            train with ``meta_loss(...).backward()`` to hold one chunk's encoder
            activations at a time instead of all T tasks'.

    ``episode`` embeds the support and query examples of all tasks, takes the prototypes
    with :func:`pymeta.ops.prototypes` and the logits with :func:`pymeta.ops.proto_logits`;
    train with cross-entropy of the logits against the query labels. BatchNorm in
    ``encoder`` follows its mode: running statistics in eval mode, per-task batch
    statistics in train mode (see ``batch_stats``), running statistics untouched
    (:mod:`pymeta.core.norms`).

    Without ``n_way`` the number of classes N is inferred per episode as
    ``support_y.max() + 1``. Labels are ``0..N-1`` and every class needs a support
    example in every task (checked; this reads the labels, one device sync on GPU).
    """

    cli_options = frozenset({"task_chunk", "cuda_graph"})
    cli_tasks = ("classification",)

    def __init__(
        self,
        encoder: nn.Module,
        metric: str = "sqeuclidean",
        *,
        batch_stats: str = "joint",
        strategy: str = "auto",
        n_way: int | None = None,
        task_chunk: int | None = None,
    ) -> None:
        super().__init__(encoder, batch_stats=batch_stats, strategy=strategy, n_way=n_way, task_chunk=task_chunk)
        self.metric = _validate.choice("metric", metric, METRICS)

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits of every query against its task's class prototypes.

        Args:
            support_x: ``[T, S, ...]`` support inputs.
            support_y: ``[T, S]`` int64 labels ``0..N-1``, every class in every task.
            query_x: ``[T, Q, ...]`` query inputs.

        Returns:
            ``[T, Q, N]`` logits (negative distances, or cosine similarities).
        """
        n_way, _, support, query = self._embed(support_x, support_y, query_x)
        protos = ops.prototypes(support.flatten(2), support_y, n_way)  # [T, N, D]
        return ops.proto_logits(query.flatten(2), protos, self.metric)  # [T, Q, N]

    def query_loss(self, support_y: Tensor) -> LossFn:
        return F.cross_entropy

    # Logits: trained on the caller's loss_fn, as by any Learner (the metric learners
    # whose outputs are not logits train on their own query_loss instead).
    train_step = Learner.train_step

    def _check_targets(self, pred: Tensor, query_y: Tensor, loss_fn: LossFn) -> None:
        """Query labels must have a prototype: with N inferred from ``support_y``, a query
        class above every support label would otherwise fail as an index error."""
        if self.n_way is None and _validate.is_classification_loss(loss_fn) and pred.dim() == 3:
            n_way = pred.shape[-1]
            _value_checks.value_check(
                lambda: _query_classes_have_prototypes(query_y, n_way), query_y, ok=lambda: (query_y < n_way).all(),
                message=f"query_y must hold only classes with support examples: ProtoNet took N = {n_way} classes "
                        "from support_y (its largest label + 1)",
            )
        super()._check_targets(pred, query_y, loss_fn)

    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> ProtoNet:
        return cls(data.backbone(n_out=None), strategy=config.strategy, n_way=config.ways,
                   task_chunk=config.task_chunk)


def _query_classes_have_prototypes(query_y: Tensor, n_way: int) -> None:
    beyond = query_y >= n_way
    if beyond.any():
        t, q = (int(i) for i in beyond.nonzero()[0])
        label = int(query_y[t, q])
        raise ValueError(
            f"query_y[{t}, {q}] = {label}, but class {label} has no support example in any task: ProtoNet took "
            f"N = {n_way} classes from support_y (its largest label + 1), so there is no prototype for class "
            f"{label}; give every query class support examples, or pass ProtoNet(..., n_way=N) to require all N"
        )
