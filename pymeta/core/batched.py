"""Evaluate one ``nn.Module`` for T tasks at once, each task with its own weights.

Fast weights are a ``dict`` from parameter name to a tensor with a leading task dim,
``[T, *param.shape]``; parameters not in the dict are shared by all tasks and come from
the module itself. The module is run functionally (``torch.func.functional_call``), so
nothing is cloned and gradients flow to the meta-parameters through the fast weights.

Three execution strategies compute the same function:

* ``"lowered"``: the model's layers rewritten once as natively batched kernels
  (``baddbmm`` for a linear layer, a grouped convolution for a conv layer), no ``vmap``
  at all (:mod:`pymeta.core.lowered`). Only for ``nn.Sequential`` trees of common
  layers; the least overhead per step, which is what small models are made of.
* ``"vmap"``: ``torch.vmap`` over tasks; one batched kernel per layer (``bmm`` for a
  linear layer). Fastest for MLPs and heads, where a loop is launch-bound.
* ``"loop"``: one ``functional_call`` per task, stacked. On CPU, conv layers with
  per-task weights are faster this way (vmap lowers them to grouped convolutions).

``"auto"`` times the candidates on the first calls and keeps the fastest
(:class:`StrategyPicker`): ``"lowered"`` and ``"loop"`` when the model can be lowered
(``"lowered"`` runs the same kernels as ``"vmap"`` with less overhead), else ``"vmap"``
and ``"loop"``. Inside ``torch.compile`` nothing is timed: ``"auto"`` runs the strategy
it has chosen by then, else its first candidate (``"lowered"`` when the model lowers).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pymeta.core.lowered import Layer, NotLowerable, lower
from pymeta.core.norms import EpisodeFunctions, Stats, has_batch_norm, has_max_pool2d
from pymeta.ops._backends import capturing

STRATEGIES = ("auto", "lowered", "vmap", "loop")
FastWeights = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


class StrategyPicker:
    """Chooses the faster concrete strategy by timing the first calls of each.

    The first call is a warm-up (one-time costs: lazy initialisation, allocator growth),
    then at least ``trials`` calls per candidate and ``min_time`` seconds of them (at most
    ``max_trials``: short calls are measured more often, since their medians are noisier
    and every trial does the caller's real work anyway), each timed up to the next call
    (see :meth:`timed`), run interleaved (vmap, loop, vmap, loop, ...) so
    a noisy machine affects all alike; the median decides and the choice is then fixed.
    A candidate whose first timed call took more than ``drop_ratio`` times the fastest
    one's is dropped at once (a 2x-slower conv strategy is not worth two more seconds-long
    trials). ``candidates`` are the concrete strategies "auto" chooses from, in order of
    preference: the first whose median is within ``tie`` (3%) of the fastest wins, since
    closer than that the ranking is noise (``"lowered"``, listed first when the model
    lowers, also stores less for backward than ``"loop"``). On GPU each measured call
    starts with ``torch.cuda.synchronize()``, so queued kernels are counted.
    """

    def __init__(
        self,
        strategy: str = "auto",
        trials: int = 3,
        candidates: tuple[str, ...] = ("vmap", "loop"),
        drop_ratio: float = 2.0,
        tie: float = 0.03,
        min_time: float = 0.5,
        max_trials: int = 15,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.strategy = check_strategy(strategy)
        self.trials = trials
        self.drop_ratio = drop_ratio
        self.tie = tie
        self.min_time = min_time
        self.max_trials = max_trials
        self.clock = clock  # seconds; injectable so the choice logic can be tested without sleeping
        self._times: dict[str, list[float]] = {name: [] for name in candidates}
        self._warmed_up = False
        self._pending: tuple[str, float] | None = None  # (strategy, start) of the call being timed
        self.chosen: str | None = None if strategy == "auto" else strategy

    def next(self) -> str:
        if self.chosen is not None:
            return self.chosen
        return min(self._times, key=lambda name: len(self._times[name]))

    @contextlib.contextmanager
    def timed(self) -> Iterator[str]:
        """Yield the strategy to use now, timing it while still measuring.

        A call is timed from its start to the start of the next call, so the time
        includes what the caller does with the result in between -- the query loss and
        its ``backward()``, where strategies differ too -- and not just the forward.
        """
        if torch.compiler.is_compiling():
            # Timing needs the host, which a traced graph has not: take the choice made
            # (eagerly) so far, else the preferred candidate. Nothing is recorded, so
            # the traced code reads no state that changes between calls (no recompiles).
            yield self.chosen or next(iter(self._times))
            return
        if self.chosen is None and capturing():
            raise RuntimeError(
                'strategy="auto" is still timing its candidates, which a CUDA graph cannot capture: '
                f"warm up until it has chosen (it times {tuple(self._times)}) or pass a concrete strategy"
            )
        if self.chosen is None:
            _synchronize()
            self._close_pending(self.clock())
        strategy = self.next()
        if self.chosen is None and self._warmed_up:
            self._pending = (strategy, self.clock())
        self._warmed_up = True
        yield strategy

    def _close_pending(self, now: float) -> None:
        """Record the previous measured call (it ended when this one started)."""
        if self._pending is not None:
            strategy, start = self._pending
            self._pending = None
            self._times[strategy].append(now - start)
            self._decide()

    def _decide(self) -> None:
        times = self._times
        if any(not t for t in times.values()):
            return
        fastest_first = min(t[0] for t in times.values())
        for name in [n for n, t in times.items() if t[0] > self.drop_ratio * fastest_first]:
            del times[name]
        enough = all(
            len(t) >= self.max_trials or (len(t) >= self.trials and sum(t) >= self.min_time) for t in times.values()
        )
        if len(times) == 1 or enough:
            medians = {name: statistics.median(t) for name, t in times.items()}
            fastest = min(medians.values())
            # Candidates come in preference order; a later one must beat an earlier one by
            # more than the timing noise of a shared machine to be chosen.
            self.chosen = next(name for name, m in medians.items() if m <= fastest * (1 + self.tie))


def strategy_pickers(module: nn.Module) -> dict[str, StrategyPicker]:
    """Every execution-strategy picker inside ``module`` (a learner), by module name.

    What must be settled before a meta-step can be captured as a CUDA graph, and what
    a resumed run restores (another choice would change results by rounding).
    """
    return {
        f"{name}.{attr}" if name else attr: value
        for name, sub in module.named_modules()
        for attr, value in vars(sub).items()
        if isinstance(value, StrategyPicker)
    }


def _synchronize() -> None:
    """Wait for queued CUDA kernels (no-op unless CUDA is in use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TaskBatched:
    """Runs ``module`` on a batch of tasks with per-task fast weights.

    Args:
        module: any ``nn.Module`` whose forward takes one batch ``[B, ...]``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # BatchNorm follows the episode policy of pymeta.core.norms; models without it
        # skip the function-mode overhead.
        self._norms = has_batch_norm(module)
        self._max_pool = has_max_pool2d(module)
        self._lowered: Layer | NotLowerable | None = None  # built on first use

    def lowered(self) -> Layer:
        """The model lowered to batched kernels; raises :class:`NotLowerable` if it cannot be."""
        if self._lowered is None:
            try:
                self._lowered = lower(self.module)
            except NotLowerable as error:
                self._lowered = error
        if isinstance(self._lowered, NotLowerable):
            raise self._lowered
        return self._lowered

    def candidates(self) -> tuple[str, ...]:
        """The strategies ``"auto"`` times for this model (see the module docstring)."""
        try:
            self.lowered()
        except NotLowerable:
            return ("vmap", "loop")
        return ("lowered", "loop")

    def picker(self, strategy: str) -> StrategyPicker:
        """A :class:`StrategyPicker` for ``strategy`` over this model's candidates.

        Raises :class:`NotLowerable` at once when ``strategy="lowered"`` cannot run it.
        """
        if strategy == "lowered":
            self.lowered()
        return StrategyPicker(strategy, candidates=self.candidates())

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the inner loop adapts: every one that requires grad."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    @staticmethod
    def expand(params: dict[str, Tensor], num_tasks: int) -> FastWeights:
        """Initial fast weights: each parameter viewed as ``[T, *shape]`` (no copy)."""
        return {n: p.unsqueeze(0).expand(num_tasks, *p.shape) for n, p in params.items()}

    def flat(self, x: Tensor) -> Tensor:
        """``x: [T, B, ...]`` -> ``[T, B, ...]`` through the module's own weights as one
        batch of ``T * B``: for when every example is independent of the others (no
        BatchNorm, or all of it on running statistics). Max-pooling takes pymeta's
        faster CPU kernels (:class:`EpisodeFunctions`: same results)."""
        mode = EpisodeFunctions(batch_norm=False, max_pool=True) if self._max_pool else contextlib.nullcontext()
        with mode:
            return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def _function_mode(
        self, strategy: str, record: Stats | None = None, weights: FastWeights | None = None
    ) -> contextlib.AbstractContextManager:
        """The :class:`EpisodeFunctions` this model needs under ``strategy``, if any; with
        ``record``, marking the layers whose running statistics are in ``weights``."""
        max_pool = self._max_pool and strategy == "loop"
        if record is not None:
            marks = [(n.removesuffix(".running_mean"), w) for n, w in weights.items() if n.endswith(".running_mean")]
            return EpisodeFunctions(batch_norm=self._norms, max_pool=max_pool, record=record, marks=marks)
        if self._norms or max_pool:
            return EpisodeFunctions(batch_norm=self._norms, max_pool=max_pool)
        return contextlib.nullcontext()

    def forward(self, weights: FastWeights, x: Tensor, strategy: str, record: Stats | None = None) -> Tensor:
        """``weights: {name: [T, *shape]}``, ``x: [T, B, ...]`` -> ``[T, B, ...]``.

        ``weights`` may also hold BatchNorm running statistics ``[T, C]`` by buffer name
        (``"3.running_mean"``), which replace the layer's own; with a ``record`` dict,
        each such layer that normalises with batch statistics puts them there as
        ``record[layer name] = (mean [T, C], var [T, C])`` (:mod:`pymeta.core.norms`).
        """
        if strategy == "lowered":  # applies the BatchNorm episode policy itself
            return self.lowered()(weights, x, record)
        # Buffers are read-only inside episodes: modules that bump a counter in place
        # (BatchNorm's num_batches_tracked) get a private copy.
        buffers = {n: b.clone() for n, b in self.module.named_buffers() if n not in weights}
        if strategy == "vmap":

            def one_task(w: FastWeights, xt: Tensor) -> tuple[Tensor, Stats]:
                stats: Stats = {}  # per task here; vmap stacks them to [T, C]
                with self._function_mode(strategy, None if record is None else stats, w):
                    return functional_call(self.module, (w, buffers), (xt,)), stats

            out, stats = torch.vmap(one_task, randomness="different")(weights, x)
            if record is not None:
                record.update(stats)
            return out
        outs, per_task = [], []
        for t in range(x.shape[0]):
            w, stats = {n: v[t] for n, v in weights.items()}, {}
            with self._function_mode(strategy, None if record is None else stats, w):
                outs.append(functional_call(self.module, (w, buffers), (x[t],)))
            per_task.append(stats)
        if record is not None:  # [T, C] per statistic, as vmap stacks them
            record.update({n: tuple(map(torch.stack, zip(*(s[n] for s in per_task), strict=True)))
                           for n in per_task[0]})
        return torch.stack(outs)

    @staticmethod
    def losses(loss_fn: LossFn, pred: Tensor, target: Tensor, strategy: str) -> Tensor:
        """Per-task losses ``[T]`` of ``pred: [T, B, ...]`` against ``target: [T, B, ...]``."""
        if strategy == "loop":
            return torch.stack([loss_fn(p, y) for p, y in zip(pred, target, strict=True)])
        direct = _direct_losses(loss_fn, pred, target)
        return torch.vmap(loss_fn)(pred, target) if direct is None else direct


def _direct_losses(loss_fn: LossFn, pred: Tensor, target: Tensor) -> Tensor | None:
    """``[T]`` per-task mean losses for the two default losses without ``vmap``, else None.

    Same values as ``loss_fn`` per task (a mean over each task's own examples); this
    only saves ``vmap``'s per-call overhead, which matters for small models.
    """
    if loss_fn is F.mse_loss and pred.shape == target.shape:
        return (pred - target).square().flatten(1).mean(1)
    if loss_fn is F.cross_entropy and pred.dim() == 3 and target.dim() == 2 and not target.is_floating_point():
        losses = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none")
        return losses.view(target.shape).mean(1)
    return None
