"""Reading image files into ``[C, S, S]`` tensors in [0, 1], and checking them once.

Pillow opens files in many modes; each supported one is scaled by its own range:

* 8-bit modes (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``RGBa``, ``RGBX``,
  ``CMYK``, ``YCbCr``, ``HSV``): converted by Pillow to ``L`` or ``RGB``, divided by 255.
* 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, e.g. 16-bit PNGs, and
  ``I`` with values in [0, 65535], as older Pillow opens them): divided by 65535.
* 32-bit float (``F``) with values in [0, 1]: as is.

Any other mode (``LAB``, ``La``, ``I`` or ``F`` outside those ranges, ...) is an error
naming the file, never a silent clip.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV")
# Modes read as numbers of a known range, and that range.
RANGES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
GRAYSCALE_MODES = ("1", "L", "LA", *RANGES)


def check_mode(img: Image.Image, path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` if ``img``'s mode (or value range) is not supported."""
    if img.mode in EIGHT_BIT_MODES:
        return
    if img.mode not in RANGES:
        raise ValueError(
            f"{path}: image mode {img.mode!r} is not supported (supported: {', '.join(EIGHT_BIT_MODES)}, "
            f"{', '.join(RANGES)}); convert it to 8- or 16-bit grayscale or RGB"
        )
    low, high = img.getextrema()
    if low < 0 or high > RANGES[img.mode]:
        raise ValueError(
            f"{path}: image mode {img.mode!r} with values in [{low}, {high}] is not supported: pymeta reads this "
            f"mode as values in [0, {RANGES[img.mode]:g}]"
        )


def read(path: Path, grayscale: bool, size: int) -> Tensor:
    """The image at ``path`` as float32 ``[C, size, size]`` in [0, 1], C = 1 if ``grayscale`` else 3."""
    try:
        with Image.open(path) as img:
            check_mode(img, path)
            pixels = _pixels(img, grayscale, (size, size))
    except ValueError:
        raise
    except Exception as exc:  # unreadable: not an image, truncated, ...
        raise OSError(
            f"cannot read image {path}: {type(exc).__name__}: {exc} (ImageFolderClasses(..., verify=True) "
            "checks every file once and leaves out the unreadable ones)"
        ) from exc
    x = torch.from_numpy(pixels)
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def _pixels(img: Image.Image, grayscale: bool, size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` float32 in [0, 1] of a checked image."""
    if img.mode in EIGHT_BIT_MODES:
        img = img.convert("L" if grayscale else "RGB")
        if img.size != size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.float32) / np.float32(255.0)
    # One channel of a wider range: scale to [0, 1] first, resize as 32-bit float.
    values = Image.fromarray(np.asarray(img, dtype=np.float32) / np.float32(RANGES[img.mode]), mode="F")
    if values.size != size:
        values = values.resize(size, Image.Resampling.LANCZOS)
    pixels = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)  # Lanczos overshoots at edges
    return pixels if grayscale else np.repeat(pixels[..., None], 3, axis=2)


def cache_dir() -> Path:
    """Where verification results are kept: ``$XDG_CACHE_HOME/pymeta/verified`` (``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pymeta" / "verified"


def verify(paths: Sequence[Path], progress: bool = True) -> tuple[dict[str, str], list[str]]:
    """Decode every file once; return ``({path: why it cannot be used}, [mode of each file])``.

    The result is cached under :func:`cache_dir`, keyed by the files' paths, sizes and
    modification times: a later call on unchanged files reads the cache instead.
    """
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    cached = cache_dir() / f"{digest.hexdigest()[:32]}.json"
    try:
        result = json.loads(cached.read_text())
        return result["bad"], result["modes"]
    except (OSError, ValueError, KeyError):
        pass
    bad: dict[str, str] = {}
    modes: list[str] = []
    for path in tqdm(paths, desc="verifying images (once; the result is cached)", disable=not progress,
                     leave=False):
        mode = ""
        try:
            with Image.open(path) as img:
                mode = img.mode
                img.load()  # decodes everything: a truncated file fails here
                check_mode(img, path)
        except Exception as exc:  # not an image, truncated, unsupported mode, ...
            bad[str(path)] = f"{type(exc).__name__}: {exc}"
        modes.append(mode)
    try:  # atomically: processes verifying the same files at once each write a whole file
        cached.parent.mkdir(parents=True, exist_ok=True)
        temp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps({"bad": bad, "modes": modes}))
        os.replace(temp, cached)
    except OSError:  # a read-only home: verify again next time
        pass
    return bad, modes
