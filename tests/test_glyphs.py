"""Glyphs: disjoint splits, determinism, the on-disk cache, image format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pymeta.data import Glyphs, TaskSampler
from pymeta.data import glyphs as glyphs_module


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("glyphs")


EXAMPLES = 5  # fewer than the default 20 to keep the suite fast; the classes are the same


@pytest.fixture(scope="module")
def splits(root: Path) -> dict[str, Glyphs]:
    """All three splits, rendered once for the module."""
    return {split: Glyphs(split, root=root, examples_per_class=EXAMPLES) for split in ("train", "val", "test")}


def test_split_sizes_and_image_format(splits: dict[str, Glyphs]) -> None:
    minimum = {"train": 400, "val": 100, "test": 150}
    for split, data in splits.items():
        print(f"{split}: {data.num_classes} classes, {len(data)} images, scripts {data.scripts}")
        assert data.num_classes >= minimum[split]
        assert len(data) == EXAMPLES * data.num_classes
        assert data.labels == [i // EXAMPLES for i in range(len(data))]
        assert len(data.class_names) == len(data.characters) == len(data.class_scripts) == data.num_classes
        x, y = data[len(data) - 1]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == data.num_classes - 1
        images = data.images.float() / 255
        assert images.min() == 0.0 and images.max() == 1.0
        # Ink on a blank background: mostly zeros, every image has some ink.
        assert images.mean() < 0.3
        assert images.flatten(1).sum(1).min() > 5.0


def test_splits_share_no_character_or_script(splits: dict[str, Glyphs]) -> None:
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(splits[a].characters) & set(splits[b].characters)
        assert not set(splits[a].class_names) & set(splits[b].class_names)
        assert not set(splits[a].scripts) & set(splits[b].scripts)
    for data in splits.values():
        assert len(set(data.characters)) == data.num_classes


def test_lookalike_characters_are_dropped(splits: dict[str, Glyphs]) -> None:
    everything = {c for data in splits.values() for c in data.characters}
    assert {"A", "B", "o", "x"} <= everything
    # Greek Alpha, Cyrillic A, Cyrillic o, Cyrillic ha render like Latin letters: one class, not four.
    assert not {"\u0391", "\u0410", "\u043e", "\u0445"} & everything


def test_default_has_twenty_distinct_examples_per_class(tmp_path: Path, splits: dict[str, Glyphs]) -> None:
    data = Glyphs("val", root=tmp_path)
    assert data.class_names == splits["val"].class_names
    assert len(data) == 20 * data.num_classes
    first_class = data.images[:20].flatten(1).float()
    assert torch.cdist(first_class, first_class).fill_diagonal_(float("inf")).min() > 0


def test_cache_round_trip(root: Path, splits: dict[str, Glyphs], monkeypatch: pytest.MonkeyPatch) -> None:
    data = splits["val"]
    assert data.cache_path.parent == root and data.cache_path.exists()
    assert not list(root.glob("*.tmp"))

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered although the cache exists")

    monkeypatch.setattr(glyphs_module, "render_class", no_render)
    again = Glyphs("val", root=root, examples_per_class=EXAMPLES)
    assert torch.equal(again.images, data.images)
    assert again.class_names == data.class_names and again.labels == data.labels


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = Glyphs("val", root=tmp_path / "a", seed=1, examples_per_class=3)
    b = Glyphs("val", root=tmp_path / "b", seed=1, examples_per_class=3)
    c = Glyphs("val", root=tmp_path / "c", seed=2, examples_per_class=3)
    assert torch.equal(a.images, b.images)
    assert a.class_names == c.class_names
    assert not torch.equal(a.images, c.images)
    assert a.cache_path.name == b.cache_path.name != c.cache_path.name


def test_damaged_cache_is_rendered_again(tmp_path: Path) -> None:
    good = Glyphs("val", root=tmp_path, examples_per_class=2)
    good.cache_path.write_bytes(b"not a zip archive")
    with pytest.warns(UserWarning, match="cannot read cache"):
        again = Glyphs("val", root=tmp_path, examples_per_class=2)
    assert torch.equal(again.images, good.images)


def test_other_image_size_and_transform(tmp_path: Path) -> None:
    data = Glyphs("val", root=tmp_path, image_size=32, examples_per_class=2, transform=lambda x: 1 - x)
    x, _ = data[0]
    assert x.shape == (1, 32, 32)
    torch.testing.assert_close(x, 1 - data.images[0].float().unsqueeze(0) / 255)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\), got 'background'"):
        Glyphs("background")
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        Glyphs("val", image_size=4)


def test_feeds_the_task_sampler(splits: dict[str, Glyphs]) -> None:
    ep = TaskSampler(splits["test"], n_way=5, k_shot=1, q_queries=4, meta_batch=2, seed=0).sample()
    assert ep.support_x.shape == (2, 5, 1, 28, 28) and ep.query_x.shape == (2, 20, 1, 28, 28)
