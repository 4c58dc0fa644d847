"""The batch every pymeta algorithm consumes: T tasks of support and query examples."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Episode(NamedTuple):
    """A meta-batch of T tasks, each with S support and Q query examples.

    * ``support_x``: ``[T, S, ...]`` inputs the learner adapts on.
    * ``support_y``: ``[T, S]`` int64 class labels ``0..N-1`` (classification) or
      ``[T, S, ...]`` float targets (regression).
    * ``query_x``: ``[T, Q, ...]`` inputs the adapted learner is evaluated on.
    * ``query_y``: ``[T, Q]`` or ``[T, Q, ...]``, like ``support_y``.

    A NamedTuple so it unpacks (``sx, sy, qx, qy = episode``) and so DataLoader's
    collate, ``pin_memory`` and worker transport handle it without custom code.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks in the batch."""
        return self.support_x.shape[0]

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> Episode:
        """A copy on ``device``; ``dtype`` applies to floating tensors only.

        Integer class labels keep int64: casting them to float would break
        ``cross_entropy`` and the prototype ops, which index by label.
        """

        def move(t: Tensor) -> Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)

        return Episode(*(move(t) for t in self))
