"""Counter-based random streams of episodes, shared by :class:`Sinusoid`, :class:`TaskSampler`
and :class:`SequenceSampler` (whose batches are :class:`Sequences`, not :class:`Episode`).

Batch ``i`` of a stream is drawn from a generator seeded by ``(seed, i)`` alone. So

* resuming is exact: the whole RNG state is two integers (``state_dict``);
* any batch can be re-drawn on its own (``episode_at(i)``);
* DataLoader workers need no coordination: worker ``w`` of ``W`` draws batches
  ``w, w + W, ...``, and since DataLoader returns worker outputs round-robin, the
  stream it yields is batch ``0, 1, 2, ...`` -- identical to ``num_workers=0``.
"""

from __future__ import annotations

import itertools
import secrets
from abc import abstractmethod
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pymeta import _validate
from pymeta.data.episode import Episode


def batch_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for batch ``index`` of the stream ``seed``.

    SeedSequence hashes the pair, so neighbouring indices (or seeds) give
    statistically independent streams, unlike ``manual_seed(seed + index)``.
    """
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class EpisodeStream(IterableDataset):
    """An infinite, seedable, resumable stream of :class:`Episode` batches of ``meta_batch`` tasks.

    Iterating it (directly or through ``torch.utils.data.DataLoader(stream,
    batch_size=None, num_workers=W)``) yields the same batches for every W.

    Resuming: ``state_dict()`` counts the batches drawn *in this process*. Workers of a
    DataLoader draw from their own copies, so with ``num_workers > 0`` the stream's
    state does not move: store the number of batches your loop consumed instead and
    resume with ``load_state_dict({"seed": stream.seed, "batches": consumed})``. For the
    same reason every new iterator over such a DataLoader starts again at the stored
    state; keep one iterator for training (as for any infinite stream).
    """

    def __init__(self, meta_batch: int, seed: int | None) -> None:
        self.meta_batch = _validate.positive_int("meta_batch", meta_batch)
        # An unseeded stream still gets a concrete seed, so it can be saved and resumed.
        self.seed = secrets.randbits(63) if seed is None else _validate.non_negative_int("seed", seed)
        self._batches = 0

    @abstractmethod
    def _draw(self, num_tasks: int, generator: torch.Generator) -> Episode:
        """Draw ``num_tasks`` tasks using only ``generator`` for randomness."""

    def _num_tasks(self, num_tasks: int | None) -> int:
        return self.meta_batch if num_tasks is None else _validate.positive_int("num_tasks", num_tasks)

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        """The caller's generator, or the next batch's own (which advances the stream)."""
        if generator is not None:
            return generator
        generator = batch_generator(self.seed, self._batches)
        self._batches += 1
        return generator

    def sample(self, num_tasks: int | None = None, generator: torch.Generator | None = None) -> Episode:
        """The next batch of ``num_tasks`` (default ``meta_batch``) tasks.

        With ``generator`` the draw uses it instead and the stream's state is untouched.
        """
        return self._draw(self._num_tasks(num_tasks), self._generator(generator))

    def episode_at(self, index: int, num_tasks: int | None = None) -> Episode:
        """Batch ``index`` of the stream, without changing its state (random access)."""
        _validate.non_negative_int("index", index)
        return self._draw(self._num_tasks(num_tasks), batch_generator(self.seed, index))

    def __iter__(self) -> Iterator[Episode]:
        info = get_worker_info()
        if info is None:
            while True:
                yield self.sample()
        # In a DataLoader worker: a strided share of the batch indices, see the module doc.
        for index in itertools.count(self._batches + info.id, info.num_workers):
            yield self.episode_at(index)

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "batches"}``: everything needed to continue the stream exactly."""
        return {"seed": self.seed, "batches": self._batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue the stream from a ``state_dict()``; the next batch is batch ``state["batches"]``."""
        missing = {"seed", "batches"} - set(state)
        if missing:
            raise KeyError(f"state dict is missing {sorted(missing)}, got keys {sorted(state)}")
        self.seed = _validate.non_negative_int("seed", state["seed"])
        self._batches = _validate.non_negative_int("batches", state["batches"])
