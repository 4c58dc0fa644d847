"""The outer (meta) loss of one batch of episodes, whichever learner computes it."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pymeta import _validate
from pymeta.core.batched import LossFn, TaskBatched
from pymeta.core.chunked import chunked_mean_loss


def episode_loss(
    learner: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    loss_fn: LossFn,
) -> Tensor:
    """Mean query loss over all tasks and queries: ``loss_fn(pred [T*Q, ...], query_y [T*Q, ...])``.

    ``pred`` is ``learner.episode(support_x, support_y, query_x)``, flattened over tasks
    and queries. A learner with a ``task_chunk`` (MAML, Meta-SGD, ANIL, ProtoNet)
    computes the same mean chunk by chunk with its ``meta_loss`` instead, to bound memory.
    """
    if getattr(learner, "task_chunk", None) is not None:
        return learner.meta_loss(support_x, support_y, query_x, query_y, loss_fn=loss_fn)
    pred = learner.episode(support_x, support_y, query_x)
    return loss_fn(pred.flatten(0, 1), query_y.flatten(0, 1))


class ChunkedMetaLoss:
    """``meta_loss``, the chunked outer loss, for a learner with ``episode`` (MAML,
    Meta-SGD, ANIL, ProtoNet).

    The class using it sets ``task_chunk`` (the default chunk size, None: all tasks) and
    defines ``_query_loss(support_y)``, the loss ``meta_loss`` uses by default, or
    overrides :meth:`_chunk_predictor` (MAML checks the whole episode once).
    """

    task_chunk: int | None

    def _query_loss(self, support_y: Tensor) -> LossFn:
        raise NotImplementedError

    def _chunk_predictor(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor
    ) -> tuple[LossFn, Callable[[slice], Tensor]]:
        """``(default query loss, predict)``: ``predict(tasks)`` gives those tasks' query
        predictions ``[t, Q, ...]``; here ``episode`` on the chunk, which checks it."""
        return self._query_loss(support_y), lambda tasks: self.episode(support_x[tasks], support_y[tasks], query_x[tasks])

    def meta_loss(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        task_chunk: int | None = None,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """The mean query loss over tasks of ``episode``, for memory-bound meta-batches.

        Equal to ``mean_t loss_fn(episode(...)[t], query_y[t])``, but the tasks run in
        chunks of ``task_chunk`` and each chunk's gradient is taken (and its graph freed)
        before the next chunk runs, so peak memory is one chunk's graph instead of all T
        tasks' (``task_chunk=1``: the per-task ``backward()`` footprint of learn2learn
        and easyfsl). Call ``.backward()`` on the result once, as usual; it cannot be
        differentiated twice (:func:`pymeta.core.chunked.chunked_mean_loss`).

        Args:
            support_x, support_y, query_x: as for ``episode``.
            query_y: ``[T, Q]`` labels or ``[T, Q, ...]`` targets.
            task_chunk: tasks per chunk; default: the constructor's ``task_chunk``
                (``None``: all T at once).
            loss_fn: the query loss (default: the learner's, e.g. MAML's inner loss).

        Returns:
            A scalar: the mean over tasks of each task's query loss.
        """
        default_loss, predict = self._chunk_predictor(support_x, support_y, query_x)
        loss_fn = loss_fn or default_loss
        _validate.tensor("query_y", query_y)
        _validate.same_dim(("query_x", "query_y"), query_x, query_y, 0, "the number of tasks")
        _validate.same_dim(("query_x", "query_y"), query_x, query_y, 1, "the number of queries")
        # Per-task losses as the learner's strategy computes them ("loop": one call per task).
        strategy = getattr(self, "strategy", None) or "loop"

        def task_loss_sum(tasks: slice) -> Tensor:
            pred = predict(tasks)
            _validate.targets("query_y", pred, query_y[tasks], loss_fn)
            return TaskBatched.losses(loss_fn, pred, query_y[tasks], strategy).sum()

        chunk = self.task_chunk if task_chunk is None else task_chunk
        return chunked_mean_loss(task_loss_sum, support_x.shape[0], chunk, list(self.parameters()))
