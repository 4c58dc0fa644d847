"""MAML++ (Antoniou et al. 2019, "How to train your MAML"), batched across tasks.

MAML with the paper's changes, each an option of :class:`MAMLpp`, all on by default:

* **LSLR** (``lslr``): one learned inner learning rate per adapted parameter tensor and
  inner step, ``step_lrs: [steps, tensors]``, trained by the outer optimizer.
* **Per-step BatchNorm** (``per_step_bn_stats``, ``per_step_bn_weights``): every
  ``nn.BatchNorm1d/2d/3d`` of the (unchanged) model gets per-step running statistics and
  per-step affine weights, ``[steps, C]`` each, held by this module (``step_norms``), so
  the model's own buffers are never written.
* **Multi-step loss** (``msl_epochs``): the outer loss weighs the query loss after every
  inner step with the paper's importance vector, annealed towards the last step over
  ``msl_epochs`` epochs; from then on only the last step's query loss counts.
* **Derivative-order annealing** (``first_order_epochs``): first-order meta-gradients for
  the first epochs, then second order.
* **Cosine annealing of the outer learning rate** (``cosine_min_lr``):
  :meth:`MAMLpp.outer_lr_scheduler` gives ``torch.optim.lr_scheduler.CosineAnnealingLR``.

What counts as an epoch is the caller's: :meth:`MAMLpp.set_epoch` (0-based), as the
reference passes its epoch index; ``pymeta train`` divides a run into
:data:`EPOCHS_PER_RUN` epochs (:meth:`MAMLpp.set_progress`).

Followed from the reference code (AntreasAntoniou/HowToTrainYourMAMLPytorch:
``few_shot_learning_system.py``, ``meta_neural_network_architectures.py``
``MetaBatchNormLayer``, ``inner_loop_optimizers.py``): BatchNorm index ``i`` serves the
support forward of inner step ``i`` and the query forward after that step; the per-step
BatchNorm weights are meta-learned only, not adapted in the inner loop
(``enable_inner_loop_optimizable_bn_params=False`` in its configs); the importance
vector; first order while ``epoch < first_order_epochs``. Deviations, and why:

* Running statistics. The reference calls ``F.batch_norm(..., training=True)`` at train
  and evaluation time alike, so it always normalises with the batch statistics and only
  writes the per-step running statistics, never reads them (its issues #3 and #24);
  evaluation then restores them. Here, with pymeta's BatchNorm policy
  (:mod:`pymeta.core.norms`): in train mode the per-task batch statistics (what the
  reference computes, and what ``pymeta train`` evaluates with), and each training
  episode (train mode, autograd on) then updates the per-step running statistics once,
  without a graph, from the batch statistics of its forwards at that step averaged over
  tasks, with the layer's ``momentum`` (the reference: once per task, in turn); episodes
  under ``torch.no_grad()`` leave them alone (the reference's restore). In eval mode the
  per-step running statistics are used, so they mean what PyTorch's do.
* Per-step tensors start from the model's layer (its running statistics, weight and
  bias), not from zeros and ones, so a pretrained model keeps what it learned.
* ``pymeta train`` anneals over a run of :data:`EPOCHS_PER_RUN` epochs whatever its
  length; the learning rate is annealed per outer step rather than per epoch (the same
  cosine, sampled finer).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from pymeta import _validate
from pymeta.algorithms._step_norms import StatsSum, StepNorms
from pymeta.algorithms.maml import MAML
from pymeta.core.batched import FastWeights, LossFn
from pymeta.core.chunked import chunked_mean_loss
from pymeta.core.inner_loop import InnerLR, inner_loop

if TYPE_CHECKING:
    from pymeta.training import DataSpec, TrainConfig

# pymeta train: a run is this many epochs (the reference's Omniglot runs: 100 epochs).
EPOCHS_PER_RUN = 100


def importance_vector(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The reference's per-step query-loss weights at ``epoch`` (they sum to 1).

    All ``1/steps`` at epoch 0; each epoch moves ``1/(steps*msl_epochs)`` from every
    earlier step to the last, earlier ones kept at least ``0.03/steps``.
    """
    decay, floor = 1.0 / steps / msl_epochs, 0.03 / steps
    early = max(1.0 / steps - epoch * decay, floor)
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [early] * (steps - 1) + [last]


class MAMLpp(MAML, cli=("mamlpp",)):
    """MAML++: MAML with LSLR, per-step BatchNorm, multi-step loss and annealing.

    Args:
        model: the network to meta-learn (any model ``MAML`` takes; its BatchNorm layers
            are made per step without changing it).
        lr: the inner learning rate (with ``lslr``: every learned rate's initial value).
        steps: inner steps; the per-step tensors are sized for it, so ``inner_steps`` can
            be lowered (e.g. 0 to evaluate before adaptation) but not raised.
        first_order: always first order (no derivative-order annealing needed).
        lslr: learn one rate per adapted parameter tensor and step (``step_lrs``).
        per_step_bn_stats: per-step running statistics of every BatchNorm layer.
        per_step_bn_weights: per-step BatchNorm weights and biases (meta-learned, not
            adapted); without them BatchNorm weights are adapted like any weight.
        msl_epochs: epochs of the multi-step loss (0: only the last step's loss).
        first_order_epochs: epochs of first-order meta-gradients before second order
            (0: second order throughout; the paper uses 50 of its epochs).
        cosine_min_lr: the final outer learning rate of :meth:`outer_lr_scheduler`
            (the reference's ``min_learning_rate``); None: no schedule.
        loss_fn, strategy, check_finite, checkpoint_steps, task_chunk: as in :class:`MAML`.

    With every option off, MAMLpp is MAML with the same meta-gradients. BatchNorm
    follows pymeta's policy with the per-step tensors (see the module docstring). The
    learn2learn ``clone()`` / ``adapt()`` API is MAML's only: MAML++'s steps differ.
    """

    cli_options = frozenset({"task_chunk", "checkpoint_steps"})
    cli_defaults: ClassVar[dict[str, dict[str, Any]]] = {  # the reference's Omniglot setting: 5 inner steps at 0.1
        "glyphs": dict(inner_steps=5, inner_lr=0.1), "folder": dict(inner_steps=5, inner_lr=0.1),
        "sinusoid": dict(inner_steps=5),
    }

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        steps: int = 5,
        first_order: bool = False,
        *,
        lslr: bool = True,
        per_step_bn_stats: bool = True,
        per_step_bn_weights: bool = True,
        msl_epochs: int = 10,
        first_order_epochs: int = 50,
        cosine_min_lr: float | None = 1e-5,
        loss_fn: LossFn | None = None,
        strategy: str = "auto",
        check_finite: bool = False,
        checkpoint_steps: bool = False,
        task_chunk: int | None = None,
    ) -> None:
        super().__init__(model, lr, first_order, steps=_validate.positive_int("steps", steps), loss_fn=loss_fn,
                         strategy=strategy, check_finite=check_finite, checkpoint_steps=checkpoint_steps,
                         task_chunk=task_chunk)
        self.max_steps = self.steps
        self.msl_epochs = _validate.non_negative_int("msl_epochs", msl_epochs)
        self.first_order_epochs = _validate.non_negative_int("first_order_epochs", first_order_epochs)
        self.cosine_min_lr = None if cosine_min_lr is None else _validate.positive_float(
            "cosine_min_lr", cosine_min_lr, allow_zero=True)
        self.step_norms = StepNorms(model, steps, per_step_bn_stats, per_step_bn_weights)
        replaced = self.step_norms.replaced()
        self._adapted = [n for n, p in model.named_parameters() if p.requires_grad and n not in replaced]
        self._lr_column = {name: j for j, name in enumerate(self._adapted)}
        self.step_lrs = None
        if lslr:  # row i: step i's rates, column j: the j-th adapted tensor's
            self.step_lrs = nn.Parameter(torch.full((steps, len(self._adapted)), self.lr, dtype=self._dtype()))
        self.register_buffer("msl_weights", torch.ones(steps, dtype=self._dtype()), persistent=False)
        self.set_epoch(0)

    def _dtype(self) -> torch.dtype:
        return next(self.module.parameters(), torch.empty(0)).dtype

    # ----------------------------------------------------------------- annealing
    def set_epoch(self, epoch: int) -> None:
        """Set the training epoch (0-based), which the multi-step loss weights and the
        derivative order follow; saved in ``state_dict()``."""
        self.epoch = _validate.non_negative_int("epoch", epoch)
        # Decided here, on the host: inside torch.compile these are constants per epoch
        # band (a recompile when MSL ends or second order starts), the weights a buffer.
        self._msl = self.epoch < self.msl_epochs and self.steps > 1
        self._annealed_first_order = self.epoch < self.first_order_epochs
        if self._msl:
            self.msl_weights = torch.tensor(importance_vector(self.steps, self.epoch, self.msl_epochs),
                                            dtype=self.msl_weights.dtype, device=self.msl_weights.device)

    def set_progress(self, step: int, total: int) -> None:
        """``pymeta train``'s hook: step ``step`` of ``total`` is in epoch
        ``(step - 1) * EPOCHS_PER_RUN // total``. The epoch never goes back, so a run
        resumed with more ``--iterations`` continues where the annealing was."""
        epoch = (step - 1) * EPOCHS_PER_RUN // total
        if epoch > self.epoch:
            self.set_epoch(epoch)

    def get_extra_state(self) -> Tensor:
        """The epoch, as ``state_dict()["_extra_state"]`` (a tensor, like every other entry)."""
        return torch.tensor(self.epoch)

    def set_extra_state(self, state: Tensor) -> None:
        self.set_epoch(int(state))

    def outer_lr_scheduler(
        self, optimizer: torch.optim.Optimizer, total: int, state: Mapping[str, Any] | None = None
    ) -> torch.optim.lr_scheduler.CosineAnnealingLR | None:
        """Cosine annealing of the outer learning rate over ``total`` steps down to
        ``cosine_min_lr`` (None when that is None). Call ``.step()`` after each
        ``optimizer.step()``; ``state``: a saved ``state_dict()`` to continue from."""
        if self.cosine_min_lr is None:
            return None
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=self.cosine_min_lr)
        if state is not None:
            scheduler.load_state_dict(state)
            scheduler.T_max = total  # a run resumed with more steps anneals over its new length
        return scheduler

    # ----------------------------------------------------------------- the batched API
    @property
    def inner_steps(self) -> int:
        """``steps``, the inner steps of ``episode`` (settable from 0 to the constructor's)."""
        return self.steps

    @inner_steps.setter
    def inner_steps(self, value: int) -> None:
        value = _validate.non_negative_int("inner_steps", value)
        if value > self.max_steps:
            raise ValueError(f"inner_steps must be <= {self.max_steps}: MAMLpp learned per-step rates and "
                             f"BatchNorm tensors for {self.max_steps} steps, got {value}")
        self.steps = value
        self.set_epoch(self.epoch)  # the importance vector has one weight per step

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Predictions ``[T, Q, ...]`` after ``inner_steps`` steps (see :meth:`MAML.episode`);
        a training episode (train mode, autograd on) updates the per-step statistics."""
        inner_loss = self._checked_query_loss(support_x, support_y, query_x, self.module)
        stats = StatsSum() if self._recording() else None
        with self._picker.timed() as strategy:
            pred = self._adapt(support_x, support_y, query_x, inner_loss, strategy, {self.steps}, stats)
        self._update_running_stats(stats)
        return pred[self.steps]

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
        """The multi-step loss: the mean over tasks of the query losses after every inner
        step weighted by the importance vector (while ``epoch < msl_epochs``), else of the
        last step's. With a ``task_chunk`` (argument or the learner's) its gradients are
        taken chunk by chunk as in :meth:`Learner.meta_loss`; without one it is an
        ordinary differentiable loss (``torch.compile`` traces it in one graph)."""
        inner_loss = self._checked_query_loss(support_x, support_y, query_x, self.module)
        stats = StatsSum() if self._recording() else None
        weights = {k: self.msl_weights[k - 1] for k in range(1, self.steps + 1)} if self._msl else {self.steps: 1.0}

        def predict(tasks: slice) -> list[tuple[float | Tensor, Tensor]]:
            with self._picker.timed() as strategy:
                preds = self._adapt(support_x[tasks], support_y[tasks], query_x[tasks], inner_loss, strategy,
                                    weights, stats)
            return [(w, preds[k]) for k, w in weights.items()]

        task_loss_sum = self._task_loss_sum(predict, loss_fn or inner_loss, query_x, query_y)
        chunk = self.task_chunk if task_chunk is None else task_chunk
        num_tasks = support_x.shape[0]
        if chunk is None:
            loss = task_loss_sum(slice(None)) / num_tasks
        else:
            loss = chunked_mean_loss(task_loss_sum, num_tasks, chunk, list(self.parameters()))
        self._update_running_stats(stats)
        return loss

    def outer_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_fn: LossFn
    ) -> Tensor:
        """The multi-step loss :meth:`meta_loss` (what ``pymeta train`` minimises)."""
        return self.meta_loss(support_x, support_y, query_x, query_y, loss_fn=loss_fn)

    def _recording(self) -> bool:
        """Whether this forward updates per-step running statistics: a training episode."""
        return torch.is_grad_enabled() and self.step_norms.records()

    def _adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        loss_fn: LossFn,
        strategy: str,
        query_after: Collection[int],
        stats: StatsSum | None,
    ) -> dict[int, Tensor]:
        """``{k: query predictions [T, Q, ...] after k inner steps}`` for ``k in query_after``.

        Step ``i`` runs with BatchNorm index ``i``, so does the query forward after it
        (after 0 steps: index 0); with ``stats``, every forward's batch statistics go there.
        """
        num_tasks = support_x.shape[0]
        first_order = self.first_order or self._annealed_first_order
        fast = self._batched.expand(self._adaptable(), num_tasks)
        preds = {}
        if 0 in query_after:
            preds[0] = self._predict(fast, query_x, 0, strategy, stats)
        for i in range(self.steps):
            record = None if stats is None else []
            fast = inner_loop(
                self._batched, fast, support_x, support_y, loss_fn, self._step_lr(i, list(fast)), 1, first_order,
                strategy, self.check_finite, self.checkpoint_steps,
                extra=self.step_norms.tensors(i, num_tasks, stats is not None), record=record, first_step=i,
            )
            if stats is not None:
                stats.add(i, record[0])
            if i + 1 in query_after:
                preds[i + 1] = self._predict(fast, query_x, i, strategy, stats)
        return preds

    def _predict(self, fast: FastWeights, x: Tensor, index: int, strategy: str, stats: StatsSum | None) -> Tensor:
        """The model on ``x`` with ``fast`` weights and BatchNorm index ``index``."""
        record = None if stats is None else {}
        extra = self.step_norms.tensors(index, x.shape[0], stats is not None)
        pred = self._batched.forward({**extra, **fast}, x, strategy, record)
        if stats is not None:
            stats.add(index, record)
        return pred

    def _step_lr(self, index: int, names: list[str]) -> InnerLR:
        """Step ``index``'s learning rates of the adapted weights ``names`` (0-dim each), or ``lr``."""
        if self.step_lrs is None:
            return self.lr
        row = self.step_lrs[index].unbind()
        return [row[self._lr_column[n]] for n in names]

    def _adaptable(self) -> dict[str, Tensor]:
        """The weights the inner loop adapts: not the per-step BatchNorm weights."""
        params = dict(self.module.named_parameters())
        return {n: params[n] for n in self._adapted if params[n].requires_grad}

    def _update_running_stats(self, stats: StatsSum | None) -> None:
        if stats is not None:
            self.step_norms.update_running(stats)

    def task_statistics(self) -> list[Tensor]:
        """The per-step running statistics (see :meth:`Learner.task_statistics`)."""
        return self.step_norms.statistics()

    # ---------------------------------------------------------- the pymeta command
    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> MAMLpp:
        if config.eval_inner_steps > config.inner_steps:
            raise ValueError(f"eval_inner_steps must be <= inner_steps = {config.inner_steps} for mamlpp (its "
                             f"per-step tensors are learned for those), got {config.eval_inner_steps}")
        return cls(
            data.backbone(), lr=config.inner_lr, steps=config.inner_steps, first_order=config.first_order,
            loss_fn=data.loss_fn, strategy=config.strategy, check_finite=config.inner_check_finite,
            checkpoint_steps=config.checkpoint_steps, task_chunk=config.task_chunk,
        )

    def capture_blockers(self) -> list[str]:
        blockers = super().capture_blockers()
        if self.msl_epochs or self.first_order_epochs:
            blockers.append("MAMLpp anneals (msl_epochs, first_order_epochs), which changes the step as epochs "
                            "pass: construct it with msl_epochs=0 and first_order_epochs=0")
        return blockers

    def clone(self, *args: Any, **kwargs: Any) -> MAML:
        raise NotImplementedError("MAMLpp adapts through episode() / meta_loss(): its per-step rates and BatchNorm "
                                  "tensors are indexed by the inner step, which clone() / adapt() do not track; "
                                  "use pymeta.MAML for learn2learn's API")

    adapt = clone


