"""What ProtoNet, RelationNet and MatchingNet share: a shared-weight encoder run on every
task of an episode at once, and N inferred from the labels."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pymeta import _validate, _value_checks
from pymeta.algorithms._embed import BATCH_STATS, embed_episode, embedding_picker
from pymeta.algorithms.base import Learner
from pymeta.core.batched import LossFn, TaskBatched
from pymeta.ops._backends import capturing


class MetricLearner(Learner):
    """Base of the metric learners that compare query and support embeddings per task.

    Args (keyword-only in subclasses):
        encoder: embedding network ``[B, ...] -> [B, ...]`` with its own weights.
        batch_stats: ``"joint"`` or ``"separate"``: which examples BatchNorm in ``encoder``
            takes a task's statistics over, as for :class:`pymeta.ProtoNet` (``"separate"``:
            support and queries in two batches, as easyfsl).
        strategy: how the encoder runs on all tasks when it has BatchNorm, as for
            :class:`pymeta.ProtoNet`.
        n_way: N of every episode; default: inferred per episode as ``support_y.max() + 1``
            (a read of the labels, one device sync on GPU).
        task_chunk: the default ``task_chunk`` of :meth:`meta_loss` (None: all tasks).

    The training loss is the learner's own (:meth:`query_loss`): its outputs are not
    logits, so :meth:`train_step` uses it instead of the command's classification loss
    (ProtoNet, whose outputs are logits, keeps :meth:`Learner.train_step`).
    """

    cli_options = frozenset({"task_chunk"})
    cli_tasks = ("classification",)

    def __init__(
        self, encoder: nn.Module, *, batch_stats: str, strategy: str, n_way: int | None, task_chunk: int | None
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder
        self.batch_stats = _validate.choice("batch_stats", batch_stats, BATCH_STATS)
        if n_way is not None and _validate.positive_int("n_way", n_way) < 2:
            raise ValueError(f"n_way must be >= 2 (a {type(self).__name__} classifies among N classes), got {n_way}")
        self.n_way = n_way
        self.task_chunk = None if task_chunk is None else _validate.positive_int("task_chunk", task_chunk)
        self._embedder = TaskBatched(encoder)
        # None without BatchNorm (nothing to choose); a checkpointed attribute otherwise.
        self._picker = embedding_picker(self._embedder, strategy)

    @property
    def strategy(self) -> str | None:
        """The encoder's execution strategy: None while ``"auto"`` is still measuring, and
        None when the encoder has no BatchNorm (all tasks run as one batch)."""
        return None if self._picker is None else self._picker.chosen

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings of one batch: ``[B, ...] -> [B, ...]``."""
        return self.encoder(x)

    def _embed(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
        """``(N, class counts [T, N], support [T, S, ...], query [T, Q, ...])`` of a checked episode."""
        _validate.episode(support_x, support_y, query_x, classification=True, model=self.encoder)
        n_way = self.n_way or self._inferred_n_way(support_y)
        counts = _value_checks.class_counts(support_y, n_way, "support_y")
        support, query = embed_episode(self._embedder, self._picker, support_x, query_x, self.batch_stats)
        return n_way, counts, support, query

    def _inferred_n_way(self, support_y: Tensor) -> int:
        """N from the labels ``0..N-1`` (reads them: a device sync, so never under capture)."""
        name = type(self).__name__
        if capturing():
            raise RuntimeError(f"{name} infers the number of classes from the values of support_y, which a CUDA "
                               f"graph cannot capture: pass {name}(..., n_way=N)")
        n_way = int(support_y.max()) + 1
        if n_way < 2:
            raise ValueError(f"support_y must hold at least 2 classes (labels 0..N-1), got only class {n_way - 1}")
        return n_way

    def train_step(self, batch: Any, loss_fn: LossFn) -> Tensor | None:
        """One outer step on :meth:`query_loss` (``loss_fn``, the command's data loss, is not used)."""
        return super().train_step(batch, self.query_loss(batch[1]))

    def capture_blockers(self) -> list[str]:
        blockers = super().capture_blockers()
        if self.n_way is None:
            name = type(self).__name__
            blockers.append(f"{name} infers n_way from the labels' values on the host: construct it with "
                            f"{name}(..., n_way=N)")
        return blockers
