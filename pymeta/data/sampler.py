"""N-way K-shot episodes from any map-style dataset of ``(x, label)`` pairs."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pymeta import _validate
from pymeta.data._stream import EpisodeStream
from pymeta.data.episode import Episode


def dataset_labels(dataset: Any) -> list[Hashable]:
    """The label of every example, in index order.

    Read from ``dataset.labels`` or ``dataset.targets`` (torchvision's name) when
    present, so an image dataset is not decoded just to learn its labels; otherwise
    from ``dataset[i][1]`` for every ``i``.
    """
    for name in ("labels", "targets"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            labels = labels.tolist() if isinstance(labels, (Tensor, np.ndarray)) else list(labels)
            if len(labels) != len(dataset):
                raise ValueError(f"dataset.{name} has {len(labels)} entries but the dataset has {len(dataset)} examples")
            return labels
    return [_label(dataset[i][1]) for i in range(len(dataset))]


def _label(label: Any) -> Hashable:
    # Labels that are 0-dim tensors or numpy scalars become plain Python values, so that
    # equal labels hash equally (two tensors holding 3 are different dict keys).
    return label.item() if isinstance(label, (Tensor, np.generic)) else label


def _class_name(dataset: Any, label: Hashable) -> str:
    """A readable name for ``label``: ``class_names`` / torchvision's ``classes`` when given."""
    for name in ("class_names", "classes"):
        names = getattr(dataset, name, None)
        if names is not None and isinstance(label, int) and 0 <= label < len(names):
            return str(names[label])
    return str(label)


class ClassStream(EpisodeStream):
    """Base of the streams that draw whole classes of a map-style ``(x, label)`` dataset:
    the per-class pools of example indices, the check that every class has enough
    examples, the draw of ``n_way`` random classes per task and the loading of inputs.

    Subclasses (:class:`TaskSampler`, :class:`pymeta.data.SequenceSampler`) call
    ``super().__init__`` with ``per_class``, the examples a task takes from each class,
    and ``per_class_name``, how the error message names that number.
    """

    def __init__(
        self, dataset: Any, n_way: int, per_class: int, per_class_name: str, meta_batch: int, seed: int | None
    ) -> None:
        super().__init__(meta_batch, seed)
        self.dataset = dataset
        self.n_way = _validate.positive_int("n_way", n_way)
        labels = dataset_labels(dataset)
        pools: dict[Hashable, list[int]] = {}
        for index, label in enumerate(labels):
            pools.setdefault(label, []).append(index)
        # Classes in order of first appearance: deterministic for a given dataset.
        self.classes: list[Hashable] = list(pools)
        self._pools: list[Tensor] = [torch.tensor(pools[c]) for c in self.classes]
        self._check_sizes(per_class, per_class_name)

    def _check_sizes(self, needed: int, needed_name: str) -> None:
        if len(self.classes) < self.n_way:
            raise ValueError(
                f"n_way = {self.n_way} but the dataset has only {len(self.classes)} classes"
            )
        small = [i for i, pool in enumerate(self._pools) if len(pool) < needed]
        if small:
            smallest = min(small, key=lambda i: len(self._pools[i]))
            name = _class_name(self.dataset, self.classes[smallest])
            others = f" (and {len(small) - 1} more classes are too small)" if len(small) > 1 else ""
            raise ValueError(
                f"class {name!r} has {len(self._pools[smallest])} examples but {needed_name}{others}"
            )

    def _draw_indices(self, num_tasks: int, per_class: int, generator: torch.Generator) -> Tensor:
        """Example indices ``[num_tasks, n_way, per_class]``: row ``[t, c]`` holds distinct
        examples of the class that task ``t`` labels ``c`` (classes and labels drawn at random)."""
        indices = torch.empty(num_tasks, self.n_way, per_class, dtype=torch.long)
        for t in range(num_tasks):
            # The position in a random permutation is the new label: a random relabelling.
            chosen = torch.randperm(len(self._pools), generator=generator)[: self.n_way]
            for label, c in enumerate(chosen.tolist()):
                pool = self._pools[c]
                indices[t, label] = pool[torch.randperm(len(pool), generator=generator)[:per_class]]
        return indices

    def _load(self, indices: Sequence[int]) -> Tensor:
        """Stacked inputs ``[len(indices), ...]`` of the given examples."""
        xs = []
        for i in indices:
            x = self.dataset[i][0]
            if not isinstance(x, (Tensor, np.ndarray)):
                raise TypeError(
                    f"dataset items must be (tensor, label) pairs, got x of type {type(x).__name__} at index {i}; "
                    "give the dataset a transform that converts it to a tensor"
                )
            xs.append(torch.as_tensor(x))
        return torch.stack(xs)


class TaskSampler(ClassStream):
    """Random N-way K-shot classification episodes over a map-style dataset.

    Each task picks ``n_way`` distinct classes, gives them the labels ``0..n_way-1`` in
    random order, and draws ``k_shot + q_queries`` distinct examples per class: the
    first ``k_shot`` go to the support set and the rest to the query set (so the two
    are disjoint). ``sample()`` returns an :class:`Episode` with

    * ``support_x``: ``[T, n_way * k_shot, ...]``, ``support_y``: ``[T, n_way * k_shot]`` int64
    * ``query_x``: ``[T, n_way * q_queries, ...]``, ``query_y``: ``[T, n_way * q_queries]`` int64

    grouped by label (``support_y[t] = [0]*k_shot + [1]*k_shot + ...``). Items of
    ``dataset`` are ``(x, label)`` with ``x`` a tensor (or array) of one fixed shape.

    It is a ``torch.utils.data.IterableDataset``: iterate it directly, or load in
    parallel with ``DataLoader(sampler, batch_size=None, num_workers=W)``, which yields
    exactly the batches ``num_workers=0`` would. Reproducible given ``seed``; resume with
    ``state_dict()`` / ``load_state_dict()`` (details in
    :class:`pymeta.data._stream.EpisodeStream`).
    """

    def __init__(
        self,
        dataset: Any,
        n_way: int,
        k_shot: int,
        q_queries: int,
        meta_batch: int,
        seed: int | None = None,
    ) -> None:
        self.k_shot = _validate.positive_int("k_shot", k_shot)
        self.q_queries = _validate.positive_int("q_queries", q_queries)
        needed = k_shot + q_queries
        super().__init__(dataset, n_way, needed, f"k_shot + q_queries = {k_shot} + {q_queries} = {needed}",
                         meta_batch, seed)

    def _draw(self, num_tasks: int, generator: torch.Generator) -> Episode:
        n, k, per_class = self.n_way, self.k_shot, self.k_shot + self.q_queries
        indices = self._draw_indices(num_tasks, per_class, generator)
        x = self._load(indices.flatten().tolist()).unflatten(0, (num_tasks, n, per_class))
        labels = torch.arange(n).view(1, n, 1)
        support_y = labels.expand(num_tasks, n, k).flatten(1)
        query_y = labels.expand(num_tasks, n, per_class - k).flatten(1)
        return Episode(x[:, :, :k].flatten(1, 2), support_y, x[:, :, k:].flatten(1, 2), query_y)
