"""``torch.vmap`` rules of pymeta's custom ops (registered by :class:`pymeta.ops._factory.FusedOp`).

* :func:`fold_tasks_rule`: for ops that take tensors with a leading task dim T and treat
  tasks independently, a ``torch.vmap`` needs no per-sample work: fold the vmapped dim
  into T, run the op once on ``[B * T, ...]`` and unfold the results to ``[B, T, ...]``.
* :func:`loop_rule`: any other op without a rule of its own runs once per vmapped index
  (correct for every op, one call per index).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Rule = Callable[..., tuple[Any, Any]]


def _fold(arg: Any, bdim: int | None, batch: int) -> Any:
    if not isinstance(arg, Tensor):
        return arg
    # An unbatched tensor (in_dim None) is shared by every vmapped call: repeat it per call.
    arg = arg.expand(batch, *arg.shape) if bdim is None else arg.movedim(bdim, 0)
    return arg.reshape(batch * arg.shape[1], *arg.shape[2:])


def _unfold(out: Tensor, batch: int) -> Tensor:
    return out.reshape(batch, out.shape[0] // batch, *out.shape[1:])


def fold_tasks_rule(op: Any) -> Rule:
    """The rule that folds the vmapped dim into dim 0 of every tensor of ``op``."""

    def rule(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Any, Any]:
        batch = info.batch_size
        out = op(*(_fold(a, d, batch) for a, d in zip(args, in_dims, strict=True)))
        if isinstance(out, tuple):
            return tuple(_unfold(o, batch) for o in out), (0,) * len(out)
        return _unfold(out, batch), 0

    return rule


def _select(arg: Any, bdim: Any, index: int) -> Any:
    if isinstance(arg, list):
        return [_select(a, d, index) for a, d in zip(arg, bdim, strict=True)]
    return arg if bdim is None else arg.select(bdim, index)


def _stack(outs: list[Any]) -> Any:
    if isinstance(outs[0], (list, tuple)):
        return type(outs[0])(_stack(list(parts)) for parts in zip(*outs, strict=True))
    return torch.stack(outs)


def _zeros_like(out: Any) -> Any:
    """``out_dims`` of 0 for every tensor of ``out`` (a tensor, or tuples / lists of them)."""
    if isinstance(out, (list, tuple)):
        return type(out)(_zeros_like(o) for o in out)
    return 0


def loop_rule(op: Any) -> Rule:
    """The rule that calls ``op`` once per vmapped index and stacks the results."""

    def rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        out = _stack([op(*(_select(a, d, i) for a, d in zip(args, in_dims, strict=True)))
                      for i in range(info.batch_size)])
        return out, _zeros_like(out)

    return rule
