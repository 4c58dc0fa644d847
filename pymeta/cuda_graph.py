"""CUDA-graph capture of a whole meta-training step, for batches of static shapes.

A meta-step of a small model is hundreds of short kernels (the inner loop's forward,
its ``autograd.grad``, the update, the query forward and the second-order backward), so
on a GPU the time goes to launching them. :class:`CUDAGraphStep` records the step once
as a CUDA graph -- meta-loss, ``backward`` and optionally ``optimizer.step()`` -- and
replays it for every batch with one launch, following PyTorch's whole-network capture
recipe (``torch.cuda.graph``)::

    opt = torch.optim.Adam(maml.parameters(), lr=1e-3, capturable=True)
    step = pymeta.CUDAGraphStep(maml, first_batch, optimizer=opt)
    for batch in batches:              # Episode(support_x, support_y, query_x, query_y)
        loss = step(*batch)            # a device scalar; no sync but the label check

What a captured step cannot do, and what takes its place:

* No host syncs: the checks that read label values (a label outside the model's
  classes, a class with no support example) are recorded during capture and, with
  ``validate=True``, run on every new batch before its replay (one sync); the
  ``check_finite`` option of the learners cannot be captured and is refused.
* ``checkpoint_steps`` is refused too: it replays the RNG state, which cannot be read
  during a capture.
* ``strategy="auto"`` must have chosen before the capture: the warm-up runs until every
  picker in the learner has (its timing needs the host).
* ProtoNet must be given ``n_way`` (inferring it reads the labels).
* :func:`pymeta.ops.inner_sgd` runs as plain torch ops inside the graph (its fused GPU
  kernels upload a host table per call); the graph removes the launch cost they save.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _validate, _value_checks
from pymeta.algorithms.base import Learner, episode_loss
from pymeta.core.batched import strategy_pickers

BATCH_NAMES = ("support_x", "support_y", "query_x", "query_y")


class CUDAGraphStep:
    """One meta-training step captured as a CUDA graph and replayed per batch.

    Args:
        learner: a pymeta learner with ``episode`` (MAML, MetaSGD, ANIL, ProtoNet with
            ``n_way``, FineTune); with a ``task_chunk`` its chunked ``meta_loss`` is
            captured instead (:meth:`pymeta.algorithms.Learner.outer_loss`).
        example: ``(support_x [T, S, ...], support_y, query_x [T, Q, ...], query_y)`` on
            one CUDA device: every call must pass tensors of these shapes and dtypes.
            The warm-up trains on it (below), so pass the first real batch.
        optimizer: if given, its ``step()`` is captured too, so a call is a whole
            training step. It must step on the device: Adam/AdamW/... created with
            ``capturable=True``, or SGD with a float ``lr``. Its settings are frozen into
            the graph: a call raises if one changed (a scheduler needs a tensor ``lr``,
            updated in place). If None, a call only computes gradients and
            ``optimizer.step()`` stays with the caller, free to change.
        loss_fn: the query loss of the flattened predictions ``[T*Q, ...]`` against the
            targets; default: cross-entropy for integer labels, MSE for float targets.
        warmup: eager steps on ``example`` before the capture (3, as in PyTorch's
            recipe, and more until every ``strategy="auto"`` picker in ``learner`` has
            chosen, at most ``max_warmup``). As in that recipe they are real training
            steps: with an ``optimizer`` they update the parameters.
        validate: before each replay, check the new batch's label values (one device
            sync). ``False`` skips the check: bad labels then reach the kernels, where
            they corrupt the loss or trip a device-side assert.

    Calling the step with ``(support_x, support_y, query_x, query_y)`` copies them into
    the graph's static inputs, replays it and returns the meta-loss (a fresh 0-dim
    device tensor). The gradients are left in ``.grad`` of the learner's parameters as
    if by ``zero_grad(set_to_none=True)`` then ``backward()``: they belong to the graph
    and the next call overwrites them, so step the optimizer (or copy them) in between.
    """

    def __init__(
        self,
        learner: Learner,
        example: Sequence[Tensor],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        warmup: int = 3,
        max_warmup: int = 64,
        validate: bool = True,
    ) -> None:
        if not isinstance(learner, Learner):
            raise TypeError(f"learner must be a pymeta learner (a pymeta.algorithms.Learner), got {type(learner).__name__}")
        _check_host_free(learner)
        if _validate.positive_int("warmup", warmup) > _validate.positive_int("max_warmup", max_warmup):
            raise ValueError(f"warmup must be <= max_warmup = {max_warmup}, got {warmup}")
        if optimizer is not None:
            _check_capturable(optimizer)
        self.static = _checked_example(example)
        device = self.static[0].device
        _check_cuda(device)
        _check_parameters(learner, device)
        self.learner = learner
        self.optimizer = optimizer
        self.loss_fn = loss_fn or (F.mse_loss if self.static[1].is_floating_point() else F.cross_entropy)
        self.validate = validate
        self.device = device
        self._params = list(learner.parameters())
        # Streams and graphs belong to the current device: make it the example's.
        with torch.cuda.device(device):
            self._warm_up(warmup, max_warmup)
            self._capture()
        self._optimizer_at_capture = None if optimizer is None else _OptimizerSnapshot(optimizer)

    def _step(self) -> Tensor:
        """The captured work: meta-loss on the static inputs, backward, optimizer step."""
        loss = episode_loss(self.learner, *self.static, self.loss_fn)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach()

    def _zero_grad(self) -> None:
        # None, not zeros: a captured backward must write fresh gradients, not add to them.
        for p in self._params:
            p.grad = None

    def _warm_up(self, warmup: int, max_warmup: int) -> None:
        """Eager steps on a side stream (PyTorch's recipe: lazy initialisation, the
        optimizer's state and the strategy pickers' timing all happen before capture)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            done = 0
            while done < warmup or any(p.chosen is None for p in strategy_pickers(self.learner).values()):
                if done == max_warmup:
                    unsettled = [n for n, p in strategy_pickers(self.learner).items() if p.chosen is None]
                    raise RuntimeError(f"strategy pickers {unsettled} have not chosen after {max_warmup} warm-up "
                                       "steps: raise max_warmup or pass the learner a concrete strategy")
                self._zero_grad()
                self._step()
                done += 1
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        self._zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        # An explicit stream: torch.cuda.graph's default one lives on the first device used.
        capture_stream = torch.cuda.Stream(self.device)
        with _value_checks.deferred_value_checks() as checks, torch.cuda.graph(self.graph, stream=capture_stream):
            self._loss = self._step()
        self._checks = _checks_on_inputs(checks, self.static) if self.validate else []
        # The graph's own gradient tensors: replays write them whatever .grad holds then.
        # Until the first replay they hold nothing, so .grad shows None meanwhile.
        self._grads = {p: p.grad for p in self._params if p.grad is not None}
        self._zero_grad()

    def __call__(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Run the step on one batch (shapes and dtypes of ``example``); returns the meta-loss."""
        for name, static, new in zip(BATCH_NAMES, self.static, (support_x, support_y, query_x, query_y), strict=True):
            _validate.tensor(name, new)
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(f"{name} must have the example's shape {tuple(static.shape)} and dtype "
                                 f"{static.dtype} (the graph was captured for them), got "
                                 f"{tuple(new.shape)} {new.dtype}")
        if self._optimizer_at_capture is not None:
            self._optimizer_at_capture.check()
        with torch.cuda.device(self.device):
            for static, new in zip(self.static, (support_x, support_y, query_x, query_y), strict=True):
                static.copy_(new, non_blocking=True)
            if self.validate:
                for check in self._checks:
                    check.run()
            self.graph.replay()
        for p in self._params:  # parameters the step leaves without gradient get None
            p.grad = self._grads.get(p)
        return self._loss.clone()


def _checked_example(example: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Private copies of the example batch: the graph's static inputs."""
    if not isinstance(example, Sequence) or len(example) != len(BATCH_NAMES):
        raise TypeError(f"example must be a batch {BATCH_NAMES} (e.g. a pymeta.data.Episode), "
                        f"got {type(example).__name__}")
    tensors = [_validate.tensor(f"example.{name}", t) for name, t in zip(BATCH_NAMES, example, strict=True)]
    _validate.same_device({f"example.{name}": t for name, t in zip(BATCH_NAMES, tensors, strict=True)})
    return tuple(t.clone() for t in tensors)


def _check_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("CUDAGraphStep captures CUDA graphs, but no CUDA device is visible to torch")
    if device.type != "cuda":
        raise ValueError(f"example must be on a CUDA device (a CUDA graph runs there), got tensors on {device}")


def _check_parameters(learner: nn.Module, device: torch.device) -> None:
    elsewhere = [n for n, p in learner.named_parameters() if p.device != device]
    if elsewhere:
        raise ValueError(f"the learner's parameters must be on the example's device {device}; "
                         f"{elsewhere[:3]} are not (move the learner with .to({str(device)!r}))")


def _check_host_free(learner: Learner) -> None:
    """Refuse learner options that need the host during a step (see the module docstring)."""
    blockers = learner.capture_blockers()
    if blockers:
        raise ValueError(f"a CUDA graph cannot capture this step: {blockers[0]}")


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Only optimizers whose whole step runs on the device can be captured: those created
    with ``capturable=True`` and SGD with a float ``lr`` (its momentum buffers are device
    tensors). Others keep a step count on the host (Adam without it, Adagrad), which the
    graph would freeze at its capture-time value, or read a tensor ``lr`` there."""
    for index, group in enumerate(optimizer.param_groups):
        if group.get("capturable") or (type(optimizer) is torch.optim.SGD and not isinstance(group["lr"], Tensor)):
            continue
        name = type(optimizer).__name__
        why = ("has capturable=False, so its step reads the step count on the host" if "capturable" in group
               else "steps with host-side state or a host-read lr")
        raise ValueError(
            f"optimizer param group {index} of {name} {why} and cannot be captured: create it with "
            f"capturable=True (e.g. torch.optim.{name}(params, lr, capturable=True)), use SGD with a float lr, "
            f"or leave optimizer=None and step it after each call"
        )


class _OptimizerSnapshot:
    """What a captured optimizer step froze into the graph: each param group's settings
    (floats by value, tensors by identity: a tensor ``lr`` may change in place) and the
    state tensors it updates. :meth:`check` raises if they changed since (a scheduler
    assigning a float ``lr``, ``load_state_dict``), which replays would silently ignore."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.groups = self._groups()
        self.state = self._state()

    def _groups(self) -> list[dict[str, object]]:
        return [{k: id(v) if isinstance(v, Tensor) else v for k, v in group.items() if k != "params"}
                for group in self.optimizer.param_groups]

    def _state(self) -> dict[int, dict[str, int]]:
        return {id(p): {k: id(v) for k, v in state.items() if isinstance(v, Tensor)}
                for p, state in self.optimizer.state.items()}

    def check(self) -> None:
        groups = self._groups()
        if len(groups) != len(self.groups):
            raise RuntimeError(f"the optimizer has {len(groups)} param groups, {len(self.groups)} when its step "
                               "was captured: build a new CUDAGraphStep")
        for index, (now, then) in enumerate(zip(groups, self.groups, strict=True)):
            changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
            if changed:
                raise RuntimeError(
                    f"optimizer param group {index} changed {changed} since its step was captured, and the "
                    f"graph replays the captured values: give the optimizer tensor hyperparameters changed in "
                    f"place (e.g. lr=torch.tensor(1e-3, device='cuda')), or build a new CUDAGraphStep"
                )
        if self._state() != self.state:
            raise RuntimeError("the optimizer's state tensors were replaced since its step was captured (e.g. by "
                               "load_state_dict), and the graph updates the old ones: build a new CUDAGraphStep")


def _checks_on_inputs(checks: list[_value_checks.ValueCheck], inputs: Sequence[Tensor]) -> list[_value_checks.ValueCheck]:
    """``checks``, once each is known to read only views of ``inputs``.

    A check is rerun before each replay, after the new batch is copied in; a tensor the
    step computed would still hold the previous replay's values then.
    """
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    for check in checks:
        if any(t.untyped_storage().data_ptr() not in storages for t in check.inputs):
            raise RuntimeError(
                "a label check of this learner reads a tensor computed inside the step, so it cannot run "
                "before a replay: pass validate=False to capture without it"
            )
    return checks
