"""The learner contract: what every pymeta algorithm is, and what the rest relies on.

A learner is an ``nn.Module`` subclass of :class:`Learner`. Everything outside
``pymeta/algorithms`` -- the training loop and the ``pymeta`` command, distributed
training, ``torch.compile``, :class:`pymeta.CUDAGraphStep`, the benchmarks -- talks to a
learner only through the members below, so a new algorithm is one file:

* ``episode(support_x [T, S, ...], support_y, query_x [T, Q, ...]) -> [T, Q, ...]``: the
  batched forward of a meta-batch (required).
* ``query_loss(support_y)``: the default outer loss (cross-entropy for integer labels,
  MSE for float targets).
* ``meta_loss(..., task_chunk=k)``: the mean query loss, its gradients taken ``k`` tasks
  at a time (bounded memory); ``outer_loss(...)``: ``meta_loss`` when the learner has a
  ``task_chunk``, else the plain loss of ``episode``.
* ``inner_steps``: the inner SGD steps per task (settable, e.g. more at evaluation), or
  ``None`` for learners that do not adapt by gradient steps (ProtoNet).
* ``train_step(batch, loss_fn)``: one outer step's gradients into ``.grad`` (the
  optimizer steps after); returns the loss to log. Default: ``outer_loss(...).backward()``;
  Reptile and FineTune override it.
* ``set_progress(step, total)``, ``outer_lr_scheduler(optimizer, total)``: how far the
  run is, and the outer learning-rate schedule (MAML++'s annealing; default: nothing).
* ``task_statistics()``: buffers a step updates from its tasks, which distributed
  training averages over the ranks (default: none).
* ``capture_blockers()``: the options that need the host inside a step, which neither a
  CUDA graph nor a ``fullgraph`` compile can hold.
* For the ``pymeta`` command: ``class X(Learner, cli=("name",))`` registers the class in
  :data:`LEARNERS`; :meth:`from_config` builds it from a run's config, and
  :meth:`training_batches`, ``cli_defaults``, ``cli_options`` and ``cli_tasks`` say what
  it trains on, its default settings per data set, which optional settings it honours
  and which task families (classification, regression) it learns.
* Evaluation (validation and test in the command): :meth:`eval_batches` (what to
  evaluate on; default: the data set's episodes), :meth:`task_metric` (each task's
  metric on a batch; default: query accuracy or MSE of ``episode``) and
  :meth:`test_report` (the test report; default: the command's standard one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _malloc, _validate
from pymeta.core.batched import LossFn, TaskBatched
from pymeta.core.chunked import chunked_mean_loss

if TYPE_CHECKING:  # the command's types; learners only read their fields
    from pymeta.training import DataSpec, Stats, TrainConfig

# pymeta train --algo NAME -> the learner class (filled by ``class X(Learner, cli=...)``).
LEARNERS: dict[str, type[Learner]] = {}
# Optional settings of a run a learner may honour (``Learner.cli_options``).
CLI_OPTIONS = ("task_chunk", "checkpoint_steps", "cuda_graph")


class Batches(Protocol):
    """An endless, resumable source of training batches (e.g. an ``EpisodeStream``)."""

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: Mapping[str, int]) -> None: ...


def default_loss(support_y: Tensor) -> LossFn:
    """Cross-entropy for integer labels, mean squared error for float targets."""
    return F.mse_loss if support_y.is_floating_point() else F.cross_entropy


def query_metric(pred: Tensor, target: Tensor, task: str) -> Tensor:
    """Per-task metric ``[T]`` of predictions ``[T, Q, ...]``: accuracy for classification, MSE for regression."""
    if task == "classification":
        return (pred.argmax(-1) == target).double().mean(1)
    return (pred - target).square().flatten(1).mean(1).double()


class Learner(nn.Module):
    """Base class of every pymeta learner (see the module docstring for the contract).

    Subclasses set ``task_chunk`` (the default chunk of :meth:`meta_loss`, None: all
    tasks) and implement :meth:`episode`.
    """

    task_chunk: int | None = None
    cli_names: ClassVar[tuple[str, ...]] = ()
    # {data kind: {config field: value}}: this learner's defaults in ``pymeta train``.
    cli_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # Which of CLI_OPTIONS ``from_config`` passes on (others are refused by the command).
    cli_options: ClassVar[frozenset[str]] = frozenset()
    # The task families it learns: the command refuses data of another before anything runs.
    cli_tasks: ClassVar[tuple[str, ...]] = ("classification", "regression")
    # What the K columns of a [T, K] task_metric are (a plot's axis label); "" for [T].
    metric_columns: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        # The first learner of the process keeps freed CPU memory for reuse (pymeta._malloc).
        _malloc.keep_freed_memory()

    def __init_subclass__(cls, cli: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.cli_options) - set(CLI_OPTIONS)
        if unknown:
            raise TypeError(f"{cls.__name__}.cli_options has unknown options {sorted(unknown)}; known: {CLI_OPTIONS}")
        cls.cli_names = tuple(cli)
        for name in cli:
            if name in LEARNERS and LEARNERS[name] is not cls:
                raise ValueError(f"pymeta train --algo {name!r} is taken by {LEARNERS[name].__name__}")
            LEARNERS[name] = cls

    # ----------------------------------------------------------------- the batched API
    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Predictions ``[T, Q, ...]`` for every task's queries, given its support set."""
        raise NotImplementedError(f"{type(self).__name__} must implement episode()")

    def query_loss(self, support_y: Tensor) -> LossFn:
        """The outer loss :meth:`meta_loss` uses by default."""
        return default_loss(support_y)

    def _check_targets(self, pred: Tensor, query_y: Tensor, loss_fn: LossFn) -> None:
        """Check ``query_y`` against the predictions ``pred: [T, Q, ...]`` for ``loss_fn``."""
        _validate.targets("query_y", pred, query_y, loss_fn)

    def _checked_query_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, model: nn.Module) -> LossFn:
        """:meth:`query_loss`, after checking the episode's tensors against it and ``model``
        (the network the inputs go into)."""
        loss_fn = self.query_loss(support_y)
        _validate.episode(
            support_x, support_y, query_x, classification=_validate.is_classification_loss(loss_fn), model=model
        )
        return loss_fn

    @property
    def inner_steps(self) -> int | None:
        """Inner SGD steps per task (None: this learner does not adapt by steps)."""
        return None

    @inner_steps.setter
    def inner_steps(self, value: int) -> None:
        raise AttributeError(f"{type(self).__name__} takes no inner steps")

    def _chunk_predictor(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor
    ) -> tuple[LossFn, Callable[[slice], Tensor]]:
        """``(default query loss, predict)``: ``predict(tasks)`` gives those tasks' query
        predictions ``[t, Q, ...]``; here ``episode`` on the chunk, which checks it.
        Learners that check a whole episode once override it (MAML)."""
        return self.query_loss(support_y), lambda tasks: self.episode(
            support_x[tasks], support_y[tasks], query_x[tasks]
        )

    @property
    def strategy(self) -> str | None:
        """The execution strategy in use (None: still measuring, or nothing to choose)."""
        return None

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
            task_chunk: tasks per chunk; default: the learner's ``task_chunk``
                (``None``: all T at once).
            loss_fn: the query loss (default: :meth:`query_loss`).

        Returns:
            A scalar: the mean over tasks of each task's query loss.
        """
        default, predict = self._chunk_predictor(support_x, support_y, query_x)
        task_loss_sum = self._task_loss_sum(predict, loss_fn or default, query_x, query_y)
        chunk = self.task_chunk if task_chunk is None else task_chunk
        return chunked_mean_loss(task_loss_sum, support_x.shape[0], chunk, list(self.parameters()))

    def _task_loss_sum(
        self,
        predict: Callable[[slice], Tensor | list[tuple[float | Tensor, Tensor]]],
        loss_fn: LossFn,
        query_x: Tensor,
        query_y: Tensor,
    ) -> Callable[[slice], Tensor]:
        """``fn(tasks)``: the summed query loss of those tasks, after checking ``query_y``.

        ``predict(tasks)`` gives their predictions ``[t, Q, ...]``, or ``(weight,
        predictions)`` pairs whose weighted losses add up (MAML++'s multi-step loss).
        """
        _validate.tensor("query_y", query_y)
        _validate.same_dim(("query_x", "query_y"), query_x, query_y, 0, "the number of tasks")
        _validate.same_dim(("query_x", "query_y"), query_x, query_y, 1, "the number of queries")
        # Per-task losses as the learner's strategy computes them ("loop": one call per
        # task; any other: one batched call). An "auto" still undecided runs its first
        # candidate under torch.compile, never "loop" (StrategyPicker.timed): batched too,
        # or a 32-task graph held 32 loss computations (conv4 MAML: cold compile 44 -> 76 s).
        strategy = self.strategy or ("batched" if torch.compiler.is_compiling() else "loop")

        def loss_sum(pred: Tensor, target: Tensor) -> Tensor:
            self._check_targets(pred, target, loss_fn)
            return TaskBatched.losses(loss_fn, pred, target, strategy).sum()

        def task_loss_sum(tasks: slice) -> Tensor:
            out = predict(tasks)
            if isinstance(out, Tensor):
                return loss_sum(out, query_y[tasks])
            return sum(weight * loss_sum(pred, query_y[tasks]) for weight, pred in out)

        return task_loss_sum

    def outer_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_fn: LossFn
    ) -> Tensor:
        """Mean query loss over all tasks and queries: ``loss_fn(pred [T*Q, ...], query_y [T*Q, ...])``.

        ``pred`` is ``episode(support_x, support_y, query_x)`` flattened over tasks and
        queries; with a ``task_chunk`` the same mean is computed by :meth:`meta_loss`.
        """
        if self.task_chunk is not None:
            return self.meta_loss(support_x, support_y, query_x, query_y, loss_fn=loss_fn)
        pred = self.episode(support_x, support_y, query_x)
        self._check_targets(pred, query_y, loss_fn)
        return loss_fn(pred.flatten(0, 1), query_y.flatten(0, 1))

    # ---------------------------------------------------------------- training hooks
    def train_step(self, batch: Any, loss_fn: LossFn) -> Tensor | None:
        """One outer step: gradients into ``.grad`` of the parameters, the loss to log.

        ``batch`` is what :meth:`training_batches` yields (default: an
        :class:`pymeta.data.Episode`); its leading dim is what distributed training
        shards, and the gradients and loss must be means over it.
        """
        loss = self.outer_loss(*batch, loss_fn)
        loss.backward()
        return loss.detach()

    def set_progress(self, step: int, total: int) -> None:
        """Called by ``pymeta train`` before each outer step, ``step`` counting from 1 to
        ``total``: for learners whose training changes over a run (MAML++'s annealing
        schedules). Default: nothing."""

    def outer_lr_scheduler(
        self, optimizer: torch.optim.Optimizer, total: int, state: Mapping[str, Any] | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The schedule ``pymeta train`` steps after each of the ``total`` outer steps
        (restored from ``state`` when a run resumes), or None for a constant rate (default)."""
        return None

    def task_statistics(self) -> list[Tensor]:
        """Buffers a training step updates from its tasks' batch statistics (MAML++'s
        per-step BatchNorm running statistics; default: none). Distributed training
        averages them over the ranks, weighted by their shares of the tasks
        (:func:`pymeta.distributed.all_reduce_grads`), so they stay equal on every rank."""
        return []

    def capture_blockers(self) -> list[str]:
        """Options of this learner (and its sub-learners) that need the host during a
        step: each entry says which and why (empty: the step can be captured)."""
        blockers = []
        for option, why in (("check_finite", "reads values on the host"),
                            ("checkpoint_steps", "saves and restores the RNG state on the host")):
            on = [name or "learner" for name, m in self.named_modules() if getattr(m, option, False)]
            if on:
                blockers.append(f"{on[0]} has {option}=True, which {why}: construct it with {option}=False")
        return blockers

    # ---------------------------------------------------------- the pymeta command
    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> Learner:
        """The learner ``pymeta train --algo NAME`` trains, for a resolved config."""
        raise NotImplementedError(f"{cls.__name__} cannot be built by the pymeta command")

    @classmethod
    def training_batches(cls, config: TrainConfig, data: DataSpec) -> Batches | None:
        """What :meth:`train_step` trains on, if not the training episodes (None)."""
        return None

    @classmethod
    def eval_batches(cls, config: TrainConfig, data: DataSpec, split: str, seed: int) -> Iterator[Any] | None:
        """What :meth:`task_metric` is evaluated on for ``split`` ("val" or "test"), drawn
        from ``seed``, if not the data set's episodes (None)."""
        return None

    def task_metric(self, batch: Any, task: str) -> Tensor:
        """Each task's evaluation metric on ``batch`` (what :meth:`eval_batches` yields):
        ``[T]``, or ``[T, K]`` for K metrics per task (named by ``metric_columns``; the
        command reports each column and the mean of the rows). Default: accuracy
        (``task="classification"``) or MSE of :meth:`episode` on an :class:`Episode`'s queries.
        """
        support_x, support_y, query_x, query_y = batch
        return query_metric(self.episode(support_x, support_y, query_x), query_y, task)

    def test_report(self, config: TrainConfig, test: Stats, before: Stats | None) -> str | None:
        """The test report of ``pymeta train`` / ``pymeta eval``, if not the standard one (None)."""
        return None


def episode_loss(
    learner: Learner, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_fn: LossFn
) -> Tensor:
    """``learner.outer_loss(...)``: the outer loss of one batch of episodes."""
    return learner.outer_loss(support_x, support_y, query_x, query_y, loss_fn)

