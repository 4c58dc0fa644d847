"""The data of a run: :class:`DataSpec` per ``--data`` kind (sinusoid, glyphs,
folder:PATH), :func:`build` (learner and data for a config), and :class:`ShuffledBatches`,
the supervised batches of learners that pre-train (FineTune)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _validate, distributed
from pymeta.algorithms import LEARNERS
from pymeta.algorithms.base import Batches
from pymeta.data import Episode
from pymeta.data._stream import batch_generator
from pymeta.training.config import TrainConfig


@dataclass
class DataSpec:
    """What an algorithm builder needs to know about the data."""

    train: Batches  # the training episodes (an EpisodeStream)
    make_train_dataset: Callable[[], Any] | None  # base classes (x, label) for pre-training
    make_eval: Callable[[str, int], Iterator[Episode]]  # (split, seed) -> episodes
    task: str  # "regression" or "classification"
    example_shape: tuple[int, ...]
    out_features: int
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default=F.mse_loss)
    # split -> its class dataset of (x, label), for learners that draw their own batches
    make_dataset: Callable[[str], Any] | None = None

    def backbone(self, n_out: int | str | None = "head") -> nn.Module:
        """The standard network for the data: MLP 1-40-40-1 for regression, conv4 for images.

        ``n_out="head"``: a classifier with one output per way; ``None``: the encoder only.
        """
        from pymeta import models

        if self.task == "regression":
            return models.mlp(self.example_shape[0], (40, 40), self.out_features)
        n_out = self.out_features if n_out == "head" else n_out
        return models.conv4(in_channels=self.example_shape[0], n_way=n_out, image_size=self.example_shape[-1])


def _sinusoid(config: TrainConfig) -> DataSpec:
    from pymeta.data import Sinusoid

    def stream(seed: int) -> Sinusoid:
        return Sinusoid(k_shot=config.shots, q_queries=config.queries, meta_batch=config.meta_batch, seed=seed)

    return DataSpec(
        train=stream(config.seed), make_train_dataset=None, make_eval=lambda split, seed: iter(stream(seed)),
        task="regression", example_shape=(1,), out_features=1, loss_fn=F.mse_loss,
    )


SPLITS = ("train", "val", "test")


def _classification(config: TrainConfig, dataset: Callable[[str], Any]) -> DataSpec:
    """N-way K-shot episodes over the train / val / test class splits of ``dataset``.

    Every split is loaded and checked now, before any training: all give examples of
    one shape, and each has enough classes with enough examples for the episodes.
    """
    from pymeta.data import TaskSampler

    splits = {split: dataset(split) for split in SPLITS}
    shapes = {split: tuple(data[0][0].shape) for split, data in splits.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{split} {list(shape)}" for split, shape in shapes.items())
        raise ValueError(f"the splits of --data {config.data} hold examples of different shapes ({listing}); "
                         "a model takes one shape")

    def stream(split: str, seed: int) -> TaskSampler:
        try:
            return TaskSampler(splits[split], config.ways, config.shots, config.queries, config.meta_batch, seed)
        except ValueError as exc:
            raise ValueError(f"the {split} split of --data {config.data} is too small for --ways {config.ways} "
                             f"--shots {config.shots} --queries {config.queries}: {exc}") from None

    for split in SPLITS[1:]:
        stream(split, 0)
    return DataSpec(
        train=stream("train", config.seed), make_train_dataset=lambda: splits["train"],
        make_eval=lambda split, seed: iter(stream(split, seed)), task="classification",
        example_shape=shapes["train"], out_features=config.ways, loss_fn=F.cross_entropy,
        make_dataset=lambda split: splits[split],
    )


def _glyphs(config: TrainConfig) -> DataSpec:
    from pymeta.data import Glyphs

    return _classification(config, lambda split: Glyphs(split, seed=config.seed))


def _folder(config: TrainConfig) -> DataSpec:
    """Image folders, every file verified once (cached) and unusable ones left out with a
    warning; val and test read with the train split's channels and size."""
    from pymeta.data import ImageFolderClasses

    root = config.data.split(":", 1)[1]
    if not root:
        raise ValueError("data folder:PATH needs a path, e.g. --data folder:/data/omniglot")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"data folder not found: {root_path}")
    progress = distributed.rank() == 0
    train = ImageFolderClasses(root_path, split="train", verify=True, progress=progress)

    @functools.cache  # val may fall back to test: load each split once
    def split_of(split: str) -> Any:
        if split == "train":
            return train
        try:
            data = ImageFolderClasses(root_path, split, image_size=train.image_size, verify=True, progress=progress)
        except FileNotFoundError:
            if split != "val":
                raise
            # Omniglot ships no validation split: validate on the test classes then.
            return split_of("test")
        if data.grayscale != train.grayscale:
            kinds = {True: "grayscale", False: "colour"}
            warnings.warn(f"the {split} split of {root_path} holds {kinds[data.grayscale]} images, the train split "
                          f"{kinds[train.grayscale]} ones: reading {split} as {kinds[train.grayscale]}, like train",
                          stacklevel=2)
            data.grayscale = train.grayscale
        return data

    return _classification(config, split_of)


DATASETS: dict[str, Callable[[TrainConfig], DataSpec]] = {"sinusoid": _sinusoid, "glyphs": _glyphs, "folder": _folder}


def build(config: TrainConfig) -> tuple[nn.Module, DataSpec]:
    """Learner and data for a resolved config."""
    kind = config.data.split(":", 1)[0]
    spec = DATASETS[kind](config)
    torch.manual_seed(config.seed)
    learner = LEARNERS[config.algo].from_config(config, spec).to(config.device)
    return learner, spec


class Batch(NamedTuple):
    """A supervised batch ``x [B, ...]``, ``y [B]``, with ``.to(device)`` like :class:`Episode`."""

    x: Tensor
    y: Tensor

    def to(self, device: str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device))


class ShuffledBatches:
    """Endless shuffled mini-batches :class:`Batch` of a map-style ``(x, label)`` dataset.

    Full batches of ``batch_size`` in a fresh random order each epoch; epoch ``e``'s
    order is drawn from ``(seed, e)`` alone, so the state is one counter (resumable
    like an ``EpisodeStream``).
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int) -> None:
        self.dataset = dataset
        self.batch_size = _validate.positive_int("batch_size", batch_size)
        if len(dataset) < batch_size:
            raise ValueError(f"batch_size must be <= the dataset size {len(dataset)}, got {batch_size}")
        self.seed = seed
        self._batches = 0

    def __iter__(self) -> Iterator[Batch]:
        per_epoch = len(self.dataset) // self.batch_size
        while True:
            epoch, index = divmod(self._batches, per_epoch)
            order = torch.randperm(len(self.dataset), generator=batch_generator(self.seed, epoch))
            self._batches += 1
            chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
            xs, ys = zip(*(self.dataset[int(i)] for i in chosen), strict=True)
            yield Batch(torch.stack(xs), torch.as_tensor(ys))

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches": self._batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed = _validate.non_negative_int("seed", state["seed"])
        self._batches = _validate.non_negative_int("batches", state["batches"])
