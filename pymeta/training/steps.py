"""One training step: the learner's gradients (eagerly, under ``torch.compile`` or as a
replayed CUDA graph), and the NaN/inf check before the optimizer writes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pymeta.algorithms import Learner
from pymeta.cuda_graph import CUDAGraphStep
from pymeta.data import Episode
from pymeta.training.data import DataSpec


def learner_step(learner: Learner, batch: Any, spec: DataSpec) -> float | None:
    """One outer step of ``learner`` (:meth:`Learner.train_step`); the loss as a float."""
    loss = learner.train_step(batch, spec.loss_fn)
    return None if loss is None else loss.item()


class CompiledStep:
    """:meth:`Learner.train_step` under ``torch.compile`` (``pymeta train --compile``).

    Dynamo traces the learner's loss into one graph (the inner loop included: pymeta's
    engine takes its inner gradients with ``torch.func.grad`` when traced) and breaks
    the graph at ``loss.backward()``, which then runs the compiled backward. The first
    step compiles (tens of seconds on a CPU); later steps of the same shapes reuse it.
    """

    def __init__(self) -> None:
        self.compiled: Callable[[Any, Any], Tensor | None] | None = None

    def __call__(self, learner: Learner, batch: Any, spec: DataSpec) -> float | None:
        if self.compiled is None:
            self.compiled = torch.compile(learner.train_step)
        loss = self.compiled(batch, spec.loss_fn)
        return None if loss is None else loss.item()


class GraphedEpisodeStep:
    """The episode step captured as a CUDA graph on the first batch, then replayed
    (:class:`pymeta.CUDAGraphStep`; every later batch must have the first one's shapes)."""

    def __init__(self) -> None:
        self.graphed: CUDAGraphStep | None = None

    def __call__(self, learner: Learner, episode: Episode, spec: DataSpec) -> float:
        if self.graphed is None:
            self.graphed = CUDAGraphStep(learner, episode, loss_fn=spec.loss_fn)
        return self.graphed(*episode).item()


def check_finite_update(learner: nn.Module, loss: float | None, step: int) -> None:
    """Raise ``FloatingPointError`` before an optimizer step that would write NaN/inf.

    Checks the outer ``loss`` and every ``.grad`` of ``learner`` (one sync for all).
    """
    if loss is not None and not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: the meta-loss is non-finite ({loss}); parameters not updated")
    grads = {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}
    if not grads:
        return
    finite = torch.stack([g.isfinite().all() for g in grads.values()])
    if not finite.all():
        name = list(grads)[int((~finite).nonzero()[0])]
        raise FloatingPointError(f"step {step}: the meta-gradient of {name!r} is non-finite; parameters not updated")
