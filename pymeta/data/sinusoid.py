"""The sinusoid regression task family of the MAML paper (Finn et al., 2017, section 5.1)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.data._stream import EpisodeStream
from pymeta.data.episode import Episode


class SinusoidTasks(NamedTuple):
    """The hidden parameters of T sinusoid tasks: ``y = amplitude * sin(x - phase)``.

    * ``amplitude``: ``[T]``
    * ``phase``: ``[T]``
    """

    amplitude: Tensor
    phase: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        """The true functions at ``x``: ``[T, M, 1]`` (or ``[M, 1]``, shared) -> ``[T, M, 1]``.

        For plotting a task's curve under the model's predictions.
        """
        return self.amplitude.view(-1, 1, 1) * torch.sin(x - self.phase.view(-1, 1, 1))


class Sinusoid(EpisodeStream):
    """Random sinusoids ``y = A sin(x - phase)``, with A, phase and x uniform in their ranges.

    Each task has ``k_shot`` support and ``q_queries`` query points, x drawn independently
    for both. ``sample()`` returns an :class:`Episode` with

    * ``support_x``, ``support_y``: ``[T, k_shot, 1]`` float32
    * ``query_x``, ``query_y``: ``[T, q_queries, 1]`` float32

    Iterating gives an endless stream of such batches with ``T = meta_batch``.
    Reproducible given ``seed`` and resumable through ``state_dict()`` (see
    :class:`pymeta.data._stream.EpisodeStream`).
    """

    def __init__(
        self,
        k_shot: int = 10,
        q_queries: int = 10,
        meta_batch: int = 25,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int | None = None,
    ) -> None:
        super().__init__(meta_batch, seed)
        self.k_shot = _validate.positive_int("k_shot", k_shot)
        self.q_queries = _validate.positive_int("q_queries", q_queries)
        self.amplitude = _validate.interval("amplitude", amplitude)
        self.phase = _validate.interval("phase", phase)
        self.x_range = _validate.interval("x_range", x_range, strict=True)

    def _draw(self, num_tasks: int, generator: torch.Generator) -> Episode:
        return self._draw_tasks(num_tasks, generator)[0]

    def _draw_tasks(self, num_tasks: int, generator: torch.Generator) -> tuple[Episode, SinusoidTasks]:
        def uniform(bounds: tuple[float, float], *shape: int) -> Tensor:
            low, high = bounds
            return low + (high - low) * torch.rand(*shape, generator=generator)

        tasks = SinusoidTasks(uniform(self.amplitude, num_tasks), uniform(self.phase, num_tasks))
        support_x = uniform(self.x_range, num_tasks, self.k_shot, 1)
        query_x = uniform(self.x_range, num_tasks, self.q_queries, 1)
        return Episode(support_x, tasks(support_x), query_x, tasks(query_x)), tasks

    def sample_with_tasks(
        self, num_tasks: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Episode, SinusoidTasks]:
        """Like :meth:`sample`, also returning the tasks' amplitudes and phases (``[T]`` each)."""
        return self._draw_tasks(self._num_tasks(num_tasks), self._generator(generator))
