"""Episodes, the sinusoid family, the N-way K-shot sampler and image folders."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pymeta.data import Episode, ImageFolderClasses, Sinusoid, TaskSampler


class Indexed(Dataset):
    """Class ``c`` has ``sizes[c]`` examples; ``x = [index, label]`` so tests can see which were drawn."""

    def __init__(self, sizes: list[int], class_names: list[str] | None = None) -> None:
        self.targets = [c for c, n in enumerate(sizes) for _ in range(n)]
        if class_names is not None:
            self.class_names = class_names
        self.loads = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.loads += 1
        return torch.tensor([float(index), float(self.targets[index])]), self.targets[index]


class NoLabels(Dataset):
    """Only ``__getitem__``: the sampler must read every label through it."""

    def __init__(self, sizes: list[int]) -> None:
        self.inner = Indexed(sizes)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inner[index]
        return x, torch.tensor(y)  # tensor labels must group like ints


def assert_same(a: Episode, b: Episode) -> None:
    for name, x, y in zip(Episode._fields, a, b, strict=True):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------- Episode


def test_episode_to_casts_only_floating_tensors() -> None:
    ep = Episode(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long))
    moved = ep.to("cpu", dtype=torch.float64)
    assert moved.num_tasks == 2
    assert moved.support_x.dtype == moved.query_x.dtype == torch.float64
    assert moved.support_y.dtype == moved.query_y.dtype == torch.int64
    sx, _, _, _ = moved  # unpacks like a tuple
    assert sx.shape == (2, 3, 4)


# ----------------------------------------------------------------------------- Sinusoid


def test_sinusoid_shapes_ranges_and_task_parameters() -> None:
    data = Sinusoid(k_shot=5, q_queries=7, meta_batch=200, seed=0)
    ep, tasks = data.sample_with_tasks()
    assert ep.support_x.shape == ep.support_y.shape == (200, 5, 1)
    assert ep.query_x.shape == ep.query_y.shape == (200, 7, 1)
    assert all(t.dtype == torch.float32 for t in ep)
    assert tasks.amplitude.shape == tasks.phase.shape == (200,)
    assert tasks.amplitude.min() >= 0.1 and tasks.amplitude.max() <= 5.0
    assert tasks.phase.min() >= 0.0 and tasks.phase.max() <= math.pi
    for x in (ep.support_x, ep.query_x):
        assert x.min() >= -5.0 and x.max() <= 5.0
    expected = tasks.amplitude.view(-1, 1, 1) * torch.sin(ep.support_x - tasks.phase.view(-1, 1, 1))
    torch.testing.assert_close(ep.support_y, expected)
    torch.testing.assert_close(ep.query_y, tasks(ep.query_x))
    # The ranges are really used, not a corner of them.
    assert tasks.amplitude.max() - tasks.amplitude.min() > 4.0
    assert ep.support_x.max() - ep.support_x.min() > 9.0


def test_sinusoid_custom_ranges_and_num_tasks() -> None:
    data = Sinusoid(k_shot=3, q_queries=2, amplitude=(1.0, 1.0), phase=(0.5, 0.5), x_range=(0.0, 1.0), seed=1)
    ep, tasks = data.sample_with_tasks(num_tasks=4)
    assert ep.num_tasks == 4
    assert torch.all(tasks.amplitude == 1.0) and torch.all(tasks.phase == 0.5)
    assert ep.query_x.min() >= 0.0 and ep.query_x.max() <= 1.0


def test_sinusoid_is_reproducible_resumable_and_iterable() -> None:
    a, b = Sinusoid(seed=7), Sinusoid(seed=7)
    assert_same(a.sample(), b.sample())
    assert not torch.equal(Sinusoid(seed=8).sample().support_x, Sinusoid(seed=7).sample().support_x)

    state = a.state_dict()
    expected = [a.sample() for _ in range(3)]
    resumed = Sinusoid(seed=123)
    resumed.load_state_dict(state)
    for want in expected:
        assert_same(resumed.sample(), want)

    # An explicit generator leaves the stream's own state alone.
    before = a.state_dict()
    a.sample(generator=torch.Generator().manual_seed(0))
    assert a.state_dict() == before

    it = iter(Sinusoid(meta_batch=3, seed=7))
    first, second = next(it), next(it)
    assert first.num_tasks == 3
    assert not torch.equal(first.support_x, second.support_x)
    assert_same(first, Sinusoid(seed=7).episode_at(0, num_tasks=3))


def test_unseeded_sinusoid_can_still_be_resumed() -> None:
    data = Sinusoid()
    state = data.state_dict()
    ep = data.sample()
    other = Sinusoid()
    other.load_state_dict(state)
    assert_same(other.sample(), ep)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k_shot": 0}, ValueError, "k_shot must be >= 1"),
        ({"meta_batch": -1}, ValueError, "meta_batch must be >= 0"),
        ({"q_queries": 2.5}, TypeError, "q_queries must be an int"),
        ({"amplitude": (5.0, 0.1)}, ValueError, "amplitude must satisfy low <= high"),
        ({"x_range": (1.0, 1.0)}, ValueError, "x_range must satisfy low < high"),
        ({"phase": 3.0}, TypeError, "phase must be a"),
        ({"seed": -3}, ValueError, "seed must be >= 0"),
    ],
)
def test_sinusoid_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Sinusoid(**kwargs)


# ----------------------------------------------------------------------------- TaskSampler


def check_episode(ep: Episode, dataset: Indexed, n: int, k: int, q: int, tasks: int) -> list[list[int]]:
    """Every property an N-way K-shot episode must have; returns each task's original classes."""
    assert ep.support_x.shape == (tasks, n * k, 2) and ep.query_x.shape == (tasks, n * q, 2)
    assert ep.support_y.shape == (tasks, n * k) and ep.query_y.shape == (tasks, n * q)
    assert ep.support_y.dtype == ep.query_y.dtype == torch.int64
    chosen = []
    for t in range(tasks):
        s_index, s_class = ep.support_x[t, :, 0].long().tolist(), ep.support_x[t, :, 1].long().tolist()
        q_index, q_class = ep.query_x[t, :, 0].long().tolist(), ep.query_x[t, :, 1].long().tolist()
        assert Counter(ep.support_y[t].tolist()) == dict.fromkeys(range(n), k)
        assert Counter(ep.query_y[t].tolist()) == dict.fromkeys(range(n), q)
        # One original class per new label, the same in support and query, N distinct ones.
        mapping: dict[int, set[int]] = {}
        for label, cls in zip(ep.support_y[t].tolist() + ep.query_y[t].tolist(), s_class + q_class, strict=True):
            mapping.setdefault(label, set()).add(cls)
        assert all(len(v) == 1 for v in mapping.values())
        classes = [next(iter(mapping[label])) for label in range(n)]
        assert len(set(classes)) == n
        # K + Q distinct examples per class, support and query disjoint, labels true to the data.
        assert len(set(s_index + q_index)) == n * (k + q)
        assert not set(s_index) & set(q_index)
        assert all(dataset.targets[i] == c for i, c in zip(s_index + q_index, s_class + q_class, strict=True))
        chosen.append(classes)
    return chosen


def test_sampler_episode_properties() -> None:
    dataset = Indexed([6, 7, 8, 9, 10, 6, 7, 8])
    sampler = TaskSampler(dataset, n_way=5, k_shot=2, q_queries=3, meta_batch=4, seed=0)
    orders = set()
    for _ in range(30):
        for classes in check_episode(sampler.sample(), dataset, 5, 2, 3, 4):
            orders.add(tuple(classes))
    # Labels are assigned in random order (not sorted by original class) and all classes appear.
    assert any(list(c) != sorted(c) for c in orders)
    assert {c for cs in orders for c in cs} == set(range(8))


def test_sampler_reads_labels_without_loading_examples() -> None:
    dataset = Indexed([5] * 10)
    sampler = TaskSampler(dataset, n_way=3, k_shot=1, q_queries=2, meta_batch=2, seed=0)
    assert dataset.loads == 0
    sampler.sample()
    assert dataset.loads == 2 * 3 * 3


def test_sampler_reads_labels_through_getitem_as_fallback() -> None:
    dataset = NoLabels([4, 4, 4])
    ep = TaskSampler(dataset, n_way=3, k_shot=1, q_queries=3, meta_batch=2, seed=0).sample()
    check_episode(ep, dataset.inner, 3, 1, 3, 2)


def test_sampler_reproducible_and_seed_dependent() -> None:
    dataset = Indexed([10] * 20)
    a = TaskSampler(dataset, 5, 1, 5, 3, seed=42)
    b = TaskSampler(dataset, 5, 1, 5, 3, seed=42)
    for _ in range(3):
        assert_same(a.sample(), b.sample())
    c = TaskSampler(dataset, 5, 1, 5, 3, seed=43)
    assert not torch.equal(c.sample().support_x, TaskSampler(dataset, 5, 1, 5, 3, seed=42).sample().support_x)


def test_sampler_state_dict_resume_gives_identical_episodes() -> None:
    dataset = Indexed([10] * 20)
    sampler = TaskSampler(dataset, 5, 2, 3, 4, seed=5)
    for _ in range(3):
        sampler.sample()
    state = sampler.state_dict()
    expected = [sampler.sample() for _ in range(3)]
    resumed = TaskSampler(dataset, 5, 2, 3, 4, seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        assert_same(resumed.sample(), want)
    # Iteration continues the same stream.
    resumed.load_state_dict(state)
    for want, got in zip(expected, iter(resumed), strict=False):
        assert_same(got, want)
    with pytest.raises(KeyError, match="missing"):
        resumed.load_state_dict({"seed": 1})


def test_sampler_explicit_generator_and_num_tasks() -> None:
    sampler = TaskSampler(Indexed([4] * 6), 2, 1, 1, 8, seed=0)
    ep = sampler.sample(num_tasks=3, generator=torch.Generator().manual_seed(1))
    assert ep.num_tasks == 3
    assert sampler.state_dict()["batches"] == 0
    assert_same(ep, sampler.sample(num_tasks=3, generator=torch.Generator().manual_seed(1)))


def test_sampler_in_dataloader_with_workers_is_deterministic() -> None:
    dataset = Indexed([8] * 12)
    sampler = TaskSampler(dataset, 4, 1, 2, 2, seed=3)

    def first(num_workers: int, count: int = 6) -> list[Episode]:
        loader = DataLoader(sampler, batch_size=None, num_workers=num_workers)
        out = []
        for ep in loader:
            out.append(ep)
            if len(out) == count:
                break
        return out

    parallel = first(2)
    # Identical to the single-process stream and to random access, batch for batch ...
    for i, ep in enumerate(parallel):
        assert isinstance(ep, Episode)
        assert_same(ep, sampler.episode_at(i))
    for a, b in zip(parallel, first(0), strict=True):
        assert_same(a, b)
    # ... and the workers drew different episodes, not copies of one stream.
    keys = {tuple(ep.support_x[..., 0].flatten().tolist()) for ep in parallel}
    assert len(keys) == len(parallel)


def test_sampler_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"class 'b' has 7 examples but k_shot \+ q_queries = 5 \+ 15 = 20"):
        TaskSampler(Indexed([30, 7, 30], class_names=["a", "b", "c"]), 2, 5, 15, 1)
    with pytest.raises(ValueError, match=r"and 1 more classes are too small"):
        TaskSampler(Indexed([3, 4, 30]), 2, 2, 3, 1)
    with pytest.raises(ValueError, match="n_way = 5 but the dataset has only 3 classes"):
        TaskSampler(Indexed([10, 10, 10]), 5, 1, 1, 1)
    for name in ("n_way", "k_shot", "q_queries", "meta_batch"):
        args = {"n_way": 2, "k_shot": 1, "q_queries": 1, "meta_batch": 1, name: 0}
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            TaskSampler(Indexed([5, 5]), **args)


def test_sampler_rejects_non_tensor_items() -> None:
    class Pictures(Indexed):
        def __getitem__(self, index: int):
            return Image.new("L", (4, 4)), self.targets[index]

    with pytest.raises(TypeError, match="give the dataset a transform"):
        TaskSampler(Pictures([3, 3]), 2, 1, 1, 1).sample()


# ----------------------------------------------------------------------------- image folders


def write_images(folder: Path, count: int, size: int = 105, mode: str = "L", ext: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:02d}.{ext}")


@pytest.fixture
def omniglot(tmp_path: Path) -> Path:
    """Omniglot's layout: images_background / images_evaluation, alphabet / character / *.png."""
    for alphabet, chars in (("Alpha", 2), ("Beta", 3)):
        for c in range(chars):
            write_images(tmp_path / "images_background" / alphabet / f"character{c + 1:02d}", 4)
    write_images(tmp_path / "images_evaluation" / "Gamma" / "character01", 4)
    write_images(tmp_path / "images_evaluation" / "Gamma" / "character02", 4)
    (tmp_path / "images_background" / ".hidden").mkdir()
    return tmp_path


def test_folder_omniglot_layout(omniglot: Path) -> None:
    train = ImageFolderClasses(omniglot, split="train")
    assert train.class_names == [
        "Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02", "Beta/character03",
    ]  # fmt: skip
    assert train.labels == [c for c in range(5) for _ in range(4)]
    x, y = train[5]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 1
    assert x.min() >= 0.0 and x.max() <= 1.0
    test = ImageFolderClasses(omniglot, split="evaluation", invert=True)
    assert test.class_names == ["Gamma/character01", "Gamma/character02"]
    plain = ImageFolderClasses(omniglot / "images_evaluation", image_size=20)
    torch.testing.assert_close(test[0][0], 1.0 - ImageFolderClasses(omniglot / "images_evaluation")[0][0])
    assert plain[0][0].shape == (1, 20, 20)
    # Labels come from .labels, so the sampler never decodes an image to index the set.
    ep = TaskSampler(train, n_way=3, k_shot=1, q_queries=2, meta_batch=2, seed=0).sample()
    assert ep.support_x.shape == (2, 3, 1, 28, 28) and ep.query_y.shape == (2, 6)


def test_folder_flat_colour_layout(tmp_path: Path) -> None:
    for split, classes in (("train", ("n01", "n02", "n03")), ("val", ("n04", "n05"))):
        for name in classes:
            write_images(tmp_path / split / name, 3, size=90, mode="RGB", ext="jpg")
    train = ImageFolderClasses(tmp_path, split="train")
    assert train.class_names == ["n01", "n02", "n03"] and train.num_classes == 3 and len(train) == 9
    x, _ = train[0]
    assert x.shape == (3, 84, 84)
    assert ImageFolderClasses(tmp_path, split="val", grayscale=True, transform=lambda t: t * 2)[0][0].shape == (1, 28, 28)


def test_folder_csv_split_files(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 4, size=84, mode="RGB", ext="jpg")
    (tmp_path / "train.csv").write_text("filename,label\n00.jpg,n01\n01.jpg,n02\n02.jpg,n01\n03.jpg,n02\n")
    data = ImageFolderClasses(tmp_path, split="train")
    assert data.class_names == ["n01", "n02"] and data.labels == [0, 1, 0, 1]
    assert data[3][0].shape == (3, 84, 84)


def test_folder_errors_name_the_path(tmp_path: Path, omniglot: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderClasses(missing)
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found .*images_background, images_evaluation"):
        ImageFolderClasses(omniglot, split="val")
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_a" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images found under .*empty.* contains: class_a"):
        ImageFolderClasses(empty)
    csv_only = tmp_path / "csv_only"
    csv_only.mkdir()
    (csv_only / "test.csv").write_text("filename,label\n")
    with pytest.raises(FileNotFoundError, match=r"test.csv.* lists images in .*images"):
        ImageFolderClasses(csv_only, split="test")
