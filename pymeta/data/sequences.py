"""Sequence episodes for model-based meta-learners (MANN): classes shown one example at a time.

Santoro et al. 2016 ("One-shot Learning with Memory-Augmented Neural Networks", section
4.1) present an episode as one sequence: N classes, L instances of each, shuffled; the
labels are a fresh random assignment per episode, and the network sees at step ``t`` the
example ``x_t`` with the label of step ``t - 1``, so it must predict each label before
being told it. :class:`SequenceSampler` draws such episodes from any class dataset;
offsetting the labels is the model's business (:class:`pymeta.MANN`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.data.sampler import ClassStream


class Sequences(NamedTuple):
    """A meta-batch of T sequence episodes: ``x [T, N*L, ...]`` inputs, ``y [T, N*L]`` int64 labels."""

    x: Tensor
    y: Tensor

    @property
    def num_tasks(self) -> int:
        """T, the number of sequences in the batch."""
        return self.x.shape[0]

    def to(self, device: torch.device | str | None = None, non_blocking: bool = False) -> Sequences:
        return Sequences(self.x.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking))


def instance_index(y: Tensor, n_classes: int) -> Tensor:
    """``[T, S]`` int64: how many earlier steps of its sequence share the label of each step
    (0 at a class's first instance, 1 at its second, ...), for ``y: [T, S]`` labels."""
    one_hot = torch.nn.functional.one_hot(y, n_classes)
    return (one_hot.cumsum(1) - one_hot).gather(2, y.unsqueeze(-1)).squeeze(-1)


class SequenceSampler(ClassStream):
    """Random sequence episodes: ``n_way`` classes x ``instances`` examples each, shuffled.

    Each sequence picks ``n_way`` distinct classes of ``dataset`` (map-style, items
    ``(x, label)``), labels them ``0..n_way-1`` in random order, draws ``instances``
    distinct examples of each and shuffles all ``n_way * instances`` of them.
    ``sample()`` returns :class:`Sequences` ``(x [T, n_way * instances, ...], y [T, n_way *
    instances])``. A class with fewer than ``instances`` examples is a ``ValueError``
    naming it.

    Seedable, resumable and DataLoader-parallel exactly like :class:`pymeta.data.TaskSampler`
    (``state_dict()`` / ``load_state_dict()``; batch ``i`` depends on ``(seed, i)`` only).
    """

    def __init__(self, dataset: Any, n_way: int, instances: int, meta_batch: int, seed: int | None = None) -> None:
        self.instances = _validate.positive_int("instances", instances)
        super().__init__(dataset, n_way, instances, f"instances = {instances}", meta_batch, seed)

    def _draw(self, num_tasks: int, generator: torch.Generator) -> Sequences:  # type: ignore[override]
        n, per_class = self.n_way, self.instances
        indices = self._draw_indices(num_tasks, per_class, generator).flatten(1)  # [T, n * L], grouped by label
        labels = torch.arange(n).repeat_interleave(per_class)
        order = torch.stack([torch.randperm(n * per_class, generator=generator) for _ in range(num_tasks)])
        x = self._load(indices.gather(1, order).flatten().tolist()).unflatten(0, (num_tasks, n * per_class))
        return Sequences(x, labels[order])
