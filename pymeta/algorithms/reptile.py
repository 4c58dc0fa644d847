"""Reptile (Nichol et al. 2018): move the initialisation toward each task's adapted weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from pymeta import _validate
from pymeta.algorithms.maml import MAML
from pymeta.core.batched import LossFn
from pymeta.core.inner_loop import inner_loop

if TYPE_CHECKING:
    from pymeta.data import Episode
    from pymeta.training import DataSpec, TrainConfig


class Reptile(MAML, cli=("reptile",)):
    """Reptile with a batched first-order inner loop.

    Training has no query loss: :meth:`outer_grad` adapts every task (``steps`` SGD
    steps at ``lr``, all tasks at once) and adds the Reptile direction to each
    trainable parameter's ``.grad``,

        ``p.grad += outer_scale * (p - mean_t phi_t)``   (``phi_t``: task t's adapted ``p``),

    so a plain optimizer step moves the initialisation toward the adapted weights
    (with ``torch.optim.SGD(lr=eps)``: ``p <- p + eps * (mean_t phi_t - p)``, the
    paper's batched update)::

        reptile = pymeta.Reptile(model, lr=0.02, steps=5)
        opt = torch.optim.SGD(reptile.parameters(), lr=0.5)   # or Adam, ...
        for ep in episodes:
            opt.zero_grad()
            x = torch.cat([ep.support_x, ep.query_x], 1)  # all of each task's examples
            y = torch.cat([ep.support_y, ep.query_y], 1)
            reptile.outer_grad(x, y)
            opt.step()

    At evaluation ``episode`` (inherited from :class:`MAML`, first order) adapts to the
    support sets the same way and predicts the queries. Being a first-order MAML, the
    learn2learn-style ``clone()`` / ``adapt(loss)`` work too.

    Args:
        model: the network; its forward takes one batch ``[B, ...]``.
        lr: inner-loop learning rate.
        steps: inner SGD steps per task, each on the task's whole batch of examples.
        outer_scale: factor of the direction written to ``.grad``. 1.0 gives the
            paper's ``theta - phi``; ``1 / (lr * steps)`` turns it into the average
            inner gradient, whose size does not depend on ``lr`` and ``steps``.
        loss_fn: inner-loop loss; default cross-entropy for integer labels, else MSE.
        strategy: ``"auto"``, ``"lowered"``, ``"vmap"`` or ``"loop"`` (see :class:`MAML`).
        check_finite: raise on a NaN/inf inner loss or gradient (see :class:`MAML`).

    BatchNorm follows MAML's episode policy (:mod:`pymeta.core.norms`).
    """

    cli_options = frozenset()
    # Several first-order steps on all of a task's examples (Nichol et al. 2018).
    cli_defaults: ClassVar[dict[str, dict[str, Any]]] = {"sinusoid": dict(inner_steps=5, inner_lr=0.02), "glyphs": dict(inner_steps=5, inner_lr=0.1)}

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        steps: int = 5,
        outer_scale: float = 1.0,
        *,
        loss_fn: LossFn | None = None,
        strategy: str = "auto",
        check_finite: bool = False,
    ) -> None:
        super().__init__(
            model, lr, first_order=True, steps=steps, loss_fn=loss_fn, strategy=strategy, check_finite=check_finite
        )
        self.outer_scale = _validate.positive_float("outer_scale", outer_scale)

    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> Reptile:
        return cls(data.backbone(), config.inner_lr, config.inner_steps, loss_fn=data.loss_fn,
                   strategy=config.strategy, check_finite=config.inner_check_finite)

    def train_step(self, batch: Episode, loss_fn: LossFn) -> None:
        """Reptile trains on all of each task's examples and has no query loss to log."""
        self.outer_grad(torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1))

    def outer_grad(self, support_x: Tensor, support_y: Tensor) -> None:
        """Accumulate the Reptile direction into ``.grad`` of every trainable parameter.

        Args:
            support_x: ``[T, S, ...]`` the examples each task adapts on (for training,
                typically all of a task's examples: support and query concatenated).
            support_y: ``[T, S]`` int64 labels or ``[T, S, ...]`` float targets.

        Adds ``outer_scale * (p - mean_t phi_t)`` to ``p.grad`` (sets it when None), as
        ``backward()`` accumulates; call ``optimizer.zero_grad()`` first.
        """
        loss_fn = self._checked_query_loss(support_x, support_y, support_x, self.module)
        num_tasks = support_x.shape[0]
        # The direction is a constant: no outer graph (the inner loop still takes its grads).
        with torch.no_grad():
            params = self._adaptable()
            with self._picker.timed() as strategy:
                adapted = inner_loop(
                    self._batched, self._batched.expand(params, num_tasks), support_x, support_y,
                    loss_fn, self._inner_lr(list(params)), self.steps, True, strategy, self.check_finite,
                )
            for name, p in params.items():
                direction = self.outer_scale * (p - adapted[name].mean(0))
                if p.grad is None:
                    p.grad = direction
                else:
                    p.grad.add_(direction)
