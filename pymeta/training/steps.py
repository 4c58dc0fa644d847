"""One training step: the learner's gradients (eagerly, under ``torch.compile`` or as a
replayed CUDA graph), and the NaN/inf check before the optimizer writes them."""

from __future__ import annotations

import math
import warnings
from collections import Counter
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

    A step that cannot be compiled (Dynamo or the backend fails on the model) is never
    a failed run: one warning names the reason and training goes on eagerly, from the
    same step, with the same results. Graph breaks other than the one at ``backward()``
    (e.g. data-dependent Python control flow in the model) are still correct but
    slower; the first step warns once, naming them.
    """

    def __init__(self) -> None:
        self.step: Callable[[Any, Any], Tensor | None] | None = None
        self.compiled = True

    def __call__(self, learner: Learner, batch: Any, spec: DataSpec) -> float | None:
        first = self.step is None
        if first:
            self.step = torch.compile(learner.train_step)
            breaks_before = graph_breaks()
        try:
            loss = self.step(batch, spec.loss_fn)
        except torch._dynamo.exc.TorchDynamoException as error:
            # Nothing of a failed step may reach the optimizer: recompute it eagerly.
            # A backend's failure says what failed in its inner exception, not its first line.
            cause = getattr(error, "inner_exception", None) or error
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            warnings.warn(f"pymeta train --compile: the training step of {type(learner).__name__} cannot be "
                          f"compiled ({type(error).__name__}: {reason}); training eagerly", stacklevel=2)
            learner.zero_grad(set_to_none=True)
            self.step, self.compiled = learner.train_step, False
            loss = self.step(batch, spec.loss_fn)
        if first and self.compiled:
            extra = graph_breaks() - breaks_before
            if extra:
                reason = next(iter(extra)).strip().splitlines()[0]
                warnings.warn(f"pymeta train --compile: the training step of {type(learner).__name__} compiled with "
                              f"{sum(extra.values())} graph break(s) besides backward(), e.g. '{reason}': correct, "
                              "but slower than one graph", stacklevel=2)
        return None if loss is None else loss.item()


def graph_breaks() -> Counter[str]:
    """Dynamo's graph-break reasons so far, without the expected one at ``backward()``."""
    from torch._dynamo.utils import counters

    return Counter({reason: n for reason, n in counters["graph_break"].items() if "Tensor.backward()" not in reason})


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
