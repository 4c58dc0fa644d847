"""Checks that read tensor *values* (label ranges, class counts), not only shapes.

They wait for the device, so each goes through :func:`value_check`, which
:func:`deferred_value_checks` can turn into records instead: a meta-step can then be
captured as a CUDA graph (no host sync allowed) and its checks run before each replay.
Like :mod:`pymeta._validate`, each raises ``ValueError`` naming the argument, what was
expected and the offending entry.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ValueCheck:
    """A check of the values of ``inputs`` (``run()`` raises ``ValueError`` on bad ones)."""

    run: Callable[[], object]  # its result is not used
    inputs: tuple[Tensor, ...]


_deferred: contextvars.ContextVar[list[ValueCheck] | None] = contextvars.ContextVar("deferred", default=None)


@contextlib.contextmanager
def deferred_value_checks() -> Iterator[list[ValueCheck]]:
    """Inside the block, checks that read tensor values are recorded, not run.

    Yields the list they are appended to. Each record reads only its ``inputs`` when
    run, so rerunning it after new values are copied into those tensors checks the new
    values (how :class:`pymeta.CUDAGraphStep` checks every batch before a replay).
    """
    checks: list[ValueCheck] = []
    token = _deferred.set(checks)
    try:
        yield checks
    finally:
        _deferred.reset(token)


def value_check(run: Callable[[], object], *inputs: Tensor, ok: Callable[[], Tensor], message: str) -> None:
    """Run ``run()`` (a check reading only ``inputs``' values) now, or record it when deferred.

    Inside ``torch.compile`` neither can happen without breaking the graph, so the check
    becomes ``torch._assert_async(ok(), message)``: ``ok()`` is the check's condition as a
    bool tensor, ``message`` its error without the values (the traced graph still
    raises, but cannot name the offending entry; run eagerly to see it).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok(), message)
        return
    checks = _deferred.get()
    if checks is None:
        run()
    else:
        checks.append(ValueCheck(run, inputs))


def labels_in_range(name: str, target: Tensor, classes: int) -> None:
    """``target`` must hold class labels in ``[0, classes)`` (reads them: a :func:`value_check`)."""
    value_check(
        lambda: _labels_in_range(name, target, classes), target,
        ok=lambda: ((target >= 0) & (target < classes)).all(),
        message=f"{name} must hold class labels in [0, {classes}) for a model with {classes} outputs",
    )


def _labels_in_range(name: str, target: Tensor, classes: int) -> None:
    bad = (target < 0) | (target >= classes)
    if bad.any():
        t, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must hold class labels in [0, {classes}) for a model with {classes} outputs, "
            f"got {name}[{t}, {s}] = {int(target[t, s])}"
        )


def class_counts(labels: Tensor, n_way: int, name: str = "labels") -> Tensor:
    """Check the values of ``labels: [T, S]``; return the per-task class counts ``[T, n_way]``.

    Every label must lie in ``[0, n_way)`` and every class must occur in every task (a
    class mean over no examples is undefined, not NaN). Reads the values: syncs on CUDA
    (a :func:`value_check`). The C++ kernels raise the same messages.
    """
    if not torch.compiler.is_compiling() and _deferred.get() is None:  # checked now: its counts are the result
        return _class_counts_checked(labels, n_way, name)
    lab = labels.long()
    in_range = ((lab >= 0) & (lab < n_way)).all()
    counts = _class_counts(lab.clamp(0, n_way - 1), n_way)
    value_check(
        lambda: _class_counts_checked(labels, n_way, name), labels, ok=lambda: in_range & (counts > 0).all(),
        message=f"{name} must hold labels in [0, n_way) = [0, {n_way}), every class in every task",
    )
    return counts


def _class_counts(labels: Tensor, n_way: int) -> Tensor:
    """``[T, n_way]`` per-task counts of ``labels: [T, S]`` (int64, values already checked)."""
    counts = torch.zeros(labels.shape[0], n_way, dtype=torch.int64, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones_like(labels))


def _class_counts_checked(labels: Tensor, n_way: int, name: str) -> Tensor:
    lab = labels.long()
    bad = (lab < 0) | (lab >= n_way)
    if bad.any():
        t, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be in [0, n_way) = [0, {n_way}), got {name}[{t}, {s}] = {int(lab[t, s])}"
        )
    counts = _class_counts(lab, n_way)
    empty = (counts == 0).nonzero()
    if len(empty):
        t, c = (int(i) for i in empty[0])
        raise ValueError(
            f"class {c} has no example in task {t} of {name}: every class in "
            f"[0, n_way) = [0, {n_way}) needs at least one support example per task"
        )
    return counts
