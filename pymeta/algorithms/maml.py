"""MAML (Finn et al. 2017), batched across tasks, and learn2learn-compatible.

Two ways to use the same module:

* Batched, the fast path: ``episode(support_x, support_y, query_x)`` adapts all T tasks
  of a meta-batch at once (fast weights ``[T, *shape]``, no Python loop over tasks, no
  module copies) and returns the query predictions ``[T, Q, ...]``.
* learn2learn's per-task API, unchanged: ``learner = maml.clone(); learner.adapt(loss);
  learner(x)``. Switching from learn2learn means changing the import.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pymeta import _validate
from pymeta.algorithms.base import Learner, default_loss
from pymeta.core.batched import LossFn, TaskBatched
from pymeta.core.inner_loop import InnerLR, inner_loop
from pymeta.ops import inner_sgd

if TYPE_CHECKING:
    from pymeta.training import DataSpec, TrainConfig


def check_lr(lr: object) -> float:
    if isinstance(lr, Tensor):
        if lr.dim() != 0:
            raise ValueError(f"lr must be a float or a 0-dim tensor, got a tensor of shape {tuple(lr.shape)}")
        lr = lr.item()
    return _validate.positive_float("lr", lr, allow_zero=True)


class MAML(Learner, cli=("maml", "fomaml")):
    """Model-Agnostic Meta-Learning with a batched inner loop.

    Args:
        model: the network to meta-learn; its forward takes one batch ``[B, ...]``.
        lr: inner-loop (fast adaptation) learning rate.
        first_order: drop second-order terms (FOMAML). Second order by default.
        allow_unused: in ``adapt``, leave parameters the loss does not use unchanged
            instead of raising (defaults to ``allow_nograd``, as in learn2learn).
        allow_nograd: in ``adapt``, skip parameters with ``requires_grad=False``
            instead of raising.
        steps: inner SGD steps taken by ``episode``.
        loss_fn: inner-loop loss ``loss_fn(pred [B, ...], target [B, ...]) -> scalar``;
            default: cross-entropy for integer labels, MSE for float targets.
        strategy: ``"auto"`` (time the candidates on the first calls and keep the
            fastest: ``"lowered"`` vs ``"loop"`` when the model lowers, else ``"vmap"``
            vs ``"loop"``), or one of ``"lowered"``, ``"vmap"``, ``"loop"``
            (:mod:`pymeta.core.batched`). All give the same meta-gradients.
        check_finite: in ``episode``, raise ``FloatingPointError`` naming the task and
            inner step whose loss or gradient is NaN/inf, instead of letting it reach
            the meta-parameters (one device sync per inner step; off by default).
        checkpoint_steps: in ``episode``, second order: store each inner step's fast
            weights instead of its graph and recompute the step during ``backward``
            (gradient checkpointing of the inner loop). For long inner loops: memory
            grows by one set of fast weights per step instead of one support graph;
            time grows by one support forward+backward per step. Same meta-gradients.
            Combine with :meth:`meta_loss`'s ``task_chunk`` to bound the query side too.
            Second order only (a first-order step keeps no graph to recompute).
        task_chunk: the default ``task_chunk`` of :meth:`meta_loss` (None: all tasks).

    BatchNorm inside ``episode`` follows the module's mode: in eval mode its running
    statistics; in train mode each task's own batch statistics (support batch in the
    inner loop, query batch for the prediction), running statistics not updated; see
    :mod:`pymeta.core.norms`.
    """

    cli_options = frozenset({"task_chunk", "checkpoint_steps", "cuda_graph"})

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        *,
        steps: int = 1,
        loss_fn: LossFn | None = None,
        strategy: str = "auto",
        check_finite: bool = False,
        checkpoint_steps: bool = False,
        task_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.module = model
        self.lr = check_lr(lr)
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self.steps = _validate.non_negative_int("steps", steps)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.check_finite = bool(check_finite)
        self.checkpoint_steps = bool(checkpoint_steps)
        if self.checkpoint_steps and self.first_order:
            raise ValueError("checkpoint_steps=True recomputes second-order inner steps, but first_order=True: "
                             "a first-order step keeps no graph to save (drop checkpoint_steps)")
        self.task_chunk = None if task_chunk is None else _validate.positive_int("task_chunk", task_chunk)
        self._batched = TaskBatched(model)
        self._picker = self._batched.picker(strategy)
        # Adapted weights of a clone (learn2learn API); None: the module's own parameters.
        self._fast: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- batched path
    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Adapt to every task's support set, predict its queries.

        Args:
            support_x: ``[T, S, ...]`` support inputs.
            support_y: ``[T, S]`` int64 labels or ``[T, S, ...]`` float targets.
            query_x: ``[T, Q, ...]`` query inputs.

        Returns:
            ``[T, Q, ...]`` predictions of the adapted models (logits for classifiers).
        """
        inner_loss = self._checked_query_loss(support_x, support_y, query_x, self.module)
        return self._adapt_and_predict(support_x, support_y, query_x, inner_loss)

    def _adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, loss_fn: LossFn) -> Tensor:
        """:meth:`episode` on already checked inputs."""
        with self._picker.timed() as strategy:
            weights = self._batched.expand(self._adaptable(), support_x.shape[0])
            weights = inner_loop(
                self._batched, weights, support_x, support_y, loss_fn,
                self._inner_lr(list(weights)), self.steps, self.first_order, strategy, self.check_finite,
                self.checkpoint_steps,
            )
            return self._batched.forward(weights, query_x, strategy)

    def _chunk_predictor(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor
    ) -> tuple[LossFn, Callable[[slice], Tensor]]:
        """For :meth:`meta_loss`: the episode is checked once here; chunks only adapt and predict."""
        inner_loss = self._checked_query_loss(support_x, support_y, query_x, self.module)
        return inner_loss, lambda tasks: self._adapt_and_predict(
            support_x[tasks], support_y[tasks], query_x[tasks], inner_loss
        )

    @property
    def strategy(self) -> str | None:
        """The execution strategy in use (None while ``"auto"`` is still measuring)."""
        return self._picker.chosen

    @property
    def inner_steps(self) -> int:
        """``steps``, the inner SGD steps of ``episode`` (settable)."""
        return self.steps

    @inner_steps.setter
    def inner_steps(self, value: int) -> None:
        self.steps = _validate.non_negative_int("inner_steps", value)

    def query_loss(self, support_y: Tensor) -> LossFn:
        """The inner-loop loss: ``loss_fn``, else cross-entropy / MSE by the labels' dtype."""
        return self.loss_fn or default_loss(support_y)

    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> MAML:
        return cls(
            data.backbone(), lr=config.inner_lr, first_order=config.first_order or config.algo == "fomaml",
            steps=config.inner_steps, loss_fn=data.loss_fn, strategy=config.strategy,
            check_finite=config.inner_check_finite, checkpoint_steps=config.checkpoint_steps,
            task_chunk=config.task_chunk,
        )

    def _adaptable(self) -> dict[str, Tensor]:
        return {n: w for n, w in self._weights().items() if w.requires_grad}

    def _inner_lr(self, names: list[str]) -> InnerLR:
        """Learning rate(s) for the adapted weights ``names`` (Meta-SGD overrides)."""
        return self.lr

    # ---------------------------------------------------- learn2learn-compatible path
    def _weights(self) -> dict[str, Tensor]:
        return dict(self.module.named_parameters()) if self._fast is None else self._fast

    def forward(self, *args, **kwargs):
        """Run the model (a clone runs it with its adapted weights)."""
        if self._fast is None:
            return self.module(*args, **kwargs)
        return functional_call(self.module, self._fast, args, kwargs)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """A clone's parameters are its adapted weights, as in learn2learn."""
        if self._fast is None:
            yield from super().named_parameters(prefix, recurse, remove_duplicate)
            return
        dot = "." if prefix else ""
        for name, weight in self._fast.items():
            yield f"{prefix}{dot}module.{name}", weight

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MAML:
        """A differentiable copy sharing the graph with this module (nothing is copied).

        Gradients of anything computed with the clone flow back to this module's
        parameters. Flags default to this module's.
        """
        learner = copy.copy(self)
        learner._fast = dict(self._weights())
        learner.first_order = self.first_order if first_order is None else bool(first_order)
        learner.allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        learner.allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        return learner

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """One inner SGD step on ``loss`` (a scalar computed with this learner)."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        self._fast = adapted(self._weights(), loss, self._inner_lr, first_order, allow_unused, allow_nograd)


def adapted(
    weights: dict[str, Tensor],
    loss: Tensor,
    inner_lr: Callable[[list[str]], InnerLR],
    first_order: bool,
    allow_unused: bool,
    allow_nograd: bool,
) -> dict[str, Tensor]:
    """learn2learn's ``adapt``: ``weights`` after one SGD step on ``loss``, with clear errors."""
    _validate.tensor("loss", loss)
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise RuntimeError("loss does not require grad: compute it from the learner's output with autograd enabled")
    nograd = [n for n, w in weights.items() if not w.requires_grad]
    if nograd and not allow_nograd:
        raise RuntimeError(
            f"parameters {nograd} do not require grad; pass allow_nograd=True to adapt only the ones that do"
        )
    names = [n for n, w in weights.items() if w.requires_grad]
    second_order = not first_order
    grads = torch.autograd.grad(
        loss, [weights[n] for n in names], retain_graph=second_order, create_graph=second_order, allow_unused=True
    )
    unused = [n for n, g in zip(names, grads, strict=True) if g is None]
    if unused and not allow_unused:
        raise RuntimeError(
            f"parameters {unused} were not used to compute the loss; pass allow_unused=True to leave them unchanged"
        )
    used = [n for n, g in zip(names, grads, strict=True) if g is not None]
    grads = [g for g in grads if g is not None]
    # The fused op expects a leading task dim; one task here.
    new = inner_sgd([weights[n].unsqueeze(0) for n in used], [g.unsqueeze(0) for g in grads], inner_lr(used))
    return {**weights, **{n: w.squeeze(0) for n, w in zip(used, new, strict=True)}}
