"""vmap rule shared by pymeta's task-batched custom ops.

Every op here takes tensors with a leading task dim T and treats tasks independently, so
a ``torch.vmap`` over such an op needs no per-sample loop: fold the vmapped dim into T,
run the op once on ``[B * T, ...]`` and unfold the results to ``[B, T, ...]``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def _fold(arg: Any, bdim: int | None, batch: int) -> Any:
    if not isinstance(arg, Tensor):
        return arg
    # An unbatched tensor (in_dim None) is shared by every vmapped call: repeat it per call.
    arg = arg.expand(batch, *arg.shape) if bdim is None else arg.movedim(bdim, 0)
    return arg.reshape(batch * arg.shape[1], *arg.shape[2:])


def _unfold(out: Tensor, batch: int) -> Tensor:
    return out.reshape(batch, out.shape[0] // batch, *out.shape[1:])


def register_task_fold(op: Any) -> None:
    """Register on custom op ``op`` the vmap rule that folds the vmapped dim into dim 0."""

    def rule(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Any, Any]:
        batch = info.batch_size
        out = op(*(_fold(a, d, batch) for a, d in zip(args, in_dims, strict=True)))
        if isinstance(out, tuple):
            return tuple(_unfold(o, batch) for o in out), (0,) * len(out)
        return _unfold(out, batch), 0

    op.register_vmap(rule)

