"""ANIL (Raghu et al. 2020): MAML that adapts only the head, on features computed once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from pymeta import _validate
from pymeta.algorithms._embed import embed_episode, embedding_picker
from pymeta.algorithms.base import Learner
from pymeta.algorithms.maml import MAML
from pymeta.core.batched import LossFn, TaskBatched

if TYPE_CHECKING:
    from pymeta.training import DataSpec, TrainConfig


class ANIL(Learner, cli=("anil",)):
    """Almost No Inner Loop: the feature extractor is shared, only ``head`` adapts per task.

    ``episode`` runs ``features`` once per episode on the support and query examples of
    all tasks together, then adapts the head of all tasks at once with the batched
    MAML engine on the support features and predicts the query features. The
    meta-gradient reaches both ``features`` (through the support features, second order
    unless ``first_order``, and the query features) and ``head``.

    ``self.head`` is a :class:`MAML` wrapping ``head``, as in learn2learn's ANIL
    example, so the per-task API works too: ``learner = anil.head.clone();
    learner.adapt(loss_fn(learner(anil.features(x)), y))``.

    Args:
        features: shared network, ``[B, ...] -> [B, ...]`` (its output feeds ``head``).
        head: the adapted network, ``[B, ...] -> [B, ...]`` (logits or predictions).
        lr: inner-loop learning rate of the head.
        steps: inner SGD steps on the head.
        first_order: drop second-order terms of the inner loop.
        loss_fn: inner-loop loss; default cross-entropy for integer labels, else MSE.
        strategy: execution strategy (see :class:`MAML`) of the head's inner loop and,
            when ``features`` has BatchNorm, of the feature embedding (``"auto"`` picks
            for each separately).
        check_finite: raise on a NaN/inf inner loss or gradient (see :class:`MAML`).
        task_chunk: the default ``task_chunk`` of :meth:`meta_loss` (None: all tasks):
            train with ``meta_loss(...).backward()`` to hold one chunk's graph at a time.

    BatchNorm in ``features`` follows its mode: running statistics in eval mode; in
    train mode each task's statistics over its support and query examples together,
    running statistics untouched (:func:`pymeta.algorithms._embed.embed_episode`).
    BatchNorm in ``head`` follows MAML's policy.
    """

    cli_options = frozenset({"task_chunk", "cuda_graph"})

    def __init__(
        self,
        features: nn.Module,
        head: nn.Module,
        lr: float,
        steps: int = 1,
        first_order: bool = False,
        loss_fn: LossFn | None = None,
        strategy: str = "auto",
        check_finite: bool = False,
        task_chunk: int | None = None,
    ) -> None:
        super().__init__()
        for name, module in (("features", features), ("head", head)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
        self.features = features
        self.head = MAML(
            head, lr, first_order, steps=steps, loss_fn=loss_fn, strategy=strategy, check_finite=check_finite
        )
        self.task_chunk = None if task_chunk is None else _validate.positive_int("task_chunk", task_chunk)
        self._embedder = TaskBatched(features)
        # None without BatchNorm in features (nothing to choose); checkpointed otherwise.
        self._embed_picker = embedding_picker(self._embedder, strategy)

    @property
    def steps(self) -> int:
        """Inner SGD steps on the head (settable, e.g. more steps at evaluation)."""
        return self.head.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.head.inner_steps = value

    inner_steps = steps

    @property
    def strategy(self) -> str | None:
        """The head's inner-loop strategy (None while ``"auto"`` is still measuring)."""
        return self.head.strategy

    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> ANIL:
        network = data.backbone()
        return cls(network[:-1], network[-1], config.inner_lr, config.inner_steps, config.first_order,
                   loss_fn=data.loss_fn, strategy=config.strategy, check_finite=config.inner_check_finite,
                   task_chunk=config.task_chunk)

    def forward(self, x: Tensor) -> Tensor:
        """The unadapted network on one batch: ``[B, ...] -> [B, ...]``."""
        return self.head(self.features(x))

    def query_loss(self, support_y: Tensor) -> LossFn:
        """The head's loss: its ``loss_fn``, else cross-entropy / MSE by the labels' dtype."""
        return self.head.query_loss(support_y)

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Adapt the head to every task's support set, predict its queries.

        Args:
            support_x: ``[T, S, ...]`` support inputs.
            support_y: ``[T, S]`` int64 labels or ``[T, S, ...]`` float targets.
            query_x: ``[T, Q, ...]`` query inputs.

        Returns:
            ``[T, Q, ...]`` predictions of the adapted heads.
        """
        self._checked_query_loss(support_x, support_y, query_x, self.features)
        support, query = embed_episode(self._embedder, self._embed_picker, support_x, query_x)
        return self.head.episode(support, support_y, query)
