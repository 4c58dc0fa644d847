"""Image folders as users have them: every pixel mode read at its own scale, unusable
files found once at start-up, and every split checked before the first training step."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pymeta import cli, training
from pymeta.data import ImageFolderClasses, _images

SIDE = 20  # image side; read at this size, so no resampling touches the values


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Verification results go to this test's own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def gradient(high: int, dtype: np.dtype) -> np.ndarray:
    """``[SIDE, SIDE]`` values spread over 0..high."""
    return (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) * high // (SIDE * SIDE - 1)).astype(dtype)


def write(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


GREY8 = gradient(255, np.uint8)
GREY16 = gradient(65535, np.uint16)
RGB8 = np.stack([GREY8, GREY8[::-1], GREY8.T], axis=2)
PALETTE = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 128]], dtype=np.uint8)
INDICES = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % 3).astype(np.uint8)


def palette_image() -> Image.Image:
    img = Image.fromarray(INDICES, "P")
    img.putpalette(PALETTE.flatten().tolist())
    return img


# (mode, file name, the image, grayscale?, the expected [C, S, S] in [0, 1] computed from the data written)
MODES = [
    ("L", "l.png", Image.fromarray(GREY8, "L"), True, GREY8[None] / 255),
    ("1", "bilevel.png", Image.fromarray(GREY8 > 127), True, (GREY8 > 127)[None].astype(np.float64)),
    ("LA", "la.png", Image.fromarray(np.stack([GREY8, GREY8[::-1]], 2), "LA"), True, GREY8[None] / 255),
    ("I;16", "sixteen.png", Image.fromarray(GREY16), True, GREY16[None] / 65535),
    ("I", "int.tif", Image.fromarray(GREY16.astype(np.int32), "I"), True, GREY16[None] / 65535),
    ("F", "float.tif", Image.fromarray(GREY16.astype(np.float32) / 65535, "F"), True, GREY16[None] / 65535),
    ("RGB", "rgb.png", Image.fromarray(RGB8, "RGB"), False, RGB8.transpose(2, 0, 1) / 255),
    ("RGBA", "rgba.png", Image.fromarray(np.concatenate([RGB8, GREY8[..., None]], 2), "RGBA"), False,
     RGB8.transpose(2, 0, 1) / 255),
    ("P", "palette.png", palette_image(), False, PALETTE[INDICES].transpose(2, 0, 1) / 255),
    ("I;16 as colour", "sixteen-rgb.png", Image.fromarray(GREY16), False, np.repeat(GREY16[None] / 65535, 3, 0)),
]


@pytest.mark.parametrize(("mode", "name", "img", "grayscale", "expected"), MODES, ids=[m[0] for m in MODES])
def test_every_supported_mode_is_read_at_its_own_scale(tmp_path, mode, name, img, grayscale, expected):
    path = write(tmp_path / "data" / "class0" / name, img)
    with Image.open(path) as reread:
        assert reread.mode == mode.split(" ")[0]  # the file really has that mode
    data = ImageFolderClasses(tmp_path / "data", image_size=SIDE, grayscale=grayscale)
    x, label = data[0]
    print(f"{mode}: mean {x.mean():.4f}, expected {expected.mean():.4f}")
    assert label == 0 and x.dtype == torch.float32 and x.shape == expected.shape
    torch.testing.assert_close(x, torch.from_numpy(expected).float(), rtol=0, atol=1e-6)


def test_sixteen_bit_pngs_decide_grayscale_and_resize_within_range(tmp_path):
    """The reported case: 16-bit PNGs read as 99.9% ones. Now the mean is the true one,
    also after resizing (Lanczos, whose overshoot is clipped to [0, 1])."""
    write(tmp_path / "data" / "a" / "x.png", Image.fromarray(GREY16))
    data = ImageFolderClasses(tmp_path / "data")  # grayscale and size from the image: 28x28
    x = data[0][0]
    print(f"16-bit PNG resized: mean {x.mean():.4f} (true {GREY16.mean() / 65535:.4f}), ones {(x == 1).float().mean():.3f}")
    assert data.grayscale and x.shape == (1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert abs(x.mean().item() - GREY16.mean() / 65535) < 0.01 and (x == 1).float().mean() < 0.01


UNSUPPORTED = [
    ("lab.tif", Image.new("LAB", (SIDE, SIDE)), "image mode 'LAB' is not supported"),
    ("negative.tif", Image.fromarray(np.full((SIDE, SIDE), -5, np.int32), "I"),
     r"image mode 'I' with values in \[-5, -5\] is not supported"),
    ("bright.tif", Image.fromarray(np.full((SIDE, SIDE), 2.0, np.float32), "F"),
     r"image mode 'F' with values in \[2.0, 2.0\] is not supported"),
]


@pytest.mark.parametrize(("name", "img", "message"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_modes_are_rejected_naming_the_file(tmp_path, name, img, message):
    path = write(tmp_path / "data" / "class0" / name, img)
    data = ImageFolderClasses(tmp_path / "data", image_size=SIDE, grayscale=True)
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        data[0]


def omniglot_like(root: Path, split: str, classes: int, per_class: int, mode: str = "L") -> None:
    rng = np.random.default_rng(classes * 100 + per_class)
    for c in range(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (SIDE, SIDE) if mode == "L" else (SIDE, SIDE, 3), dtype=np.uint8)
            write(root / split / f"class{c:02d}" / f"{i}.png", Image.fromarray(pixels, mode))


def break_files(folder: Path) -> tuple[Path, Path]:
    """One file that is no image and one truncated PNG, as a failed download leaves them."""
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"<html>503 Service Unavailable</html>")
    truncated = folder / "truncated.png"
    truncated.write_bytes((folder / "0.png").read_bytes()[:200])
    return garbage, truncated


def test_unreadable_files_are_found_once_left_out_with_one_warning_and_cached(tmp_path):
    omniglot_like(tmp_path, "train", classes=2, per_class=3)
    garbage, truncated = break_files(tmp_path / "train" / "class01")
    plain = ImageFolderClasses(tmp_path, "train")
    with pytest.raises(OSError, match=rf"cannot read image {garbage}"):
        plain[plain.paths.index(garbage)]
    with pytest.raises(OSError, match=rf"cannot read image {truncated}: OSError: image file is truncated"):
        plain[plain.paths.index(truncated)]

    with pytest.warns(UserWarning, match=r"left out 2 of 8 images") as caught:
        data = ImageFolderClasses(tmp_path, "train", verify=True, progress=False)
    assert len(caught) == 1 and str(garbage) in str(caught[0].message) and str(truncated) in str(caught[0].message)
    assert len(data) == 6 and data.labels == [0, 0, 0, 1, 1, 1] and all(x.shape == (1, 28, 28) for x, _ in data)

    # The result is cached: the second start reads it instead of decoding every file.
    (cached,) = _images.cache_dir().glob("*.json")
    record = json.loads(cached.read_text())
    record["bad"][str(tmp_path / "train" / "class00" / "0.png")] = "marked bad in the cache by this test"
    cached.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"left out 3 of 8 images"):
        ImageFolderClasses(tmp_path, "train", verify=True, progress=False)


def folder_run(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--algo", "protonet", "--data", f"folder:{root}", "--ways", "2", "--shots", "1", "--queries",
            "1", "--meta-batch", "2", "--iterations", "2", "--val-episodes", "2", "--eval-episodes", "2",
            "--strategy", "loop", "--no-progress", "--out", str(out), *extra]


def test_start_up_checks_name_the_split_before_any_training(tmp_path, capsys):
    omniglot_like(tmp_path, "train", classes=3, per_class=3)
    out = tmp_path / "runs" / "run.pt"
    # Only train/: the run stops at once (it used to train, then fail at the first validation).
    assert cli.main(folder_run(tmp_path, out)) == 2
    assert "split 'test' not found" in capsys.readouterr().err and not out.parent.exists()
    omniglot_like(tmp_path, "test", classes=3, per_class=1)
    assert cli.main(folder_run(tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert "the val split of --data folder:" in err and "class 'class00' has 1 examples but" in err
    omniglot_like(tmp_path, "val", classes=1, per_class=3)
    assert cli.main(folder_run(tmp_path, out)) == 2
    assert "the val split of --data folder:" in capsys.readouterr().err
    assert not out.parent.exists()


def test_a_folder_run_with_mixed_modes_and_broken_files_trains(tmp_path, capsys):
    """Train grayscale, test colour (or the other way round), a corrupt and a truncated
    file: the run used to crash at the first validation, or when it drew a broken file
    (and again at the same step on --resume)."""
    omniglot_like(tmp_path, "train", classes=3, per_class=3, mode="L")
    omniglot_like(tmp_path, "test", classes=3, per_class=2, mode="RGB")
    garbage, truncated = break_files(tmp_path / "train" / "class02")
    out = tmp_path / "run.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(folder_run(tmp_path, out)) == 0
    messages = [str(w.message) for w in caught]
    print("\n".join(messages))
    assert any(str(garbage) in m and str(truncated) in m for m in messages)
    assert sum("the test split of" in m and "holds colour images, the train split grayscale ones" in m
               for m in messages) == 1
    assert "test accuracy (2-way 1-shot)" in capsys.readouterr().out
    _, spec, _ = training.load_learner(out)
    assert spec.example_shape == (1, 28, 28)
    assert next(spec.make_eval("test", 0)).query_x.shape[2:] == (1, 28, 28)
