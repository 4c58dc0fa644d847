"""Glyphs: an offline Omniglot stand-in rendered from the fonts that ship with matplotlib.

Omniglot has 1623 characters from 50 alphabets, each drawn by 20 people. Glyphs has
about 1800 characters from 17 scripts and symbol sets (Latin, Greek, Cyrillic,
Armenian, Canadian Syllabics, Georgian, Hebrew, Arabic, Lao, Braille, arrows, math
operators, box drawing, ...). The "people" are 16 font faces: DejaVu Sans, Serif and
Sans Mono and STIX General, each regular, bold, italic and bold italic. Every example
is one face plus a small random affine jitter (rotation, scale, shear, shift).

* Classes: one per character, only where at least ``MIN_FACES`` faces really have a
  glyph for it (read from each font's character map, so no "missing glyph" boxes).
* Splits are by script, like Omniglot's background / evaluation alphabets, so train,
  val and test share no character. Characters that look alike across scripts (Latin
  A, Greek Alpha, Cyrillic A) would leak across splits, so each one is compared with
  every character earlier in ``SCRIPTS`` (train first) and dropped when it renders
  almost identically; the same rule drops Braille patterns that differ only by
  position and glyphs too small to read at 28x28.
* Images are ``[1, S, S]`` float32 in [0, 1] with 1 = ink (Omniglot's strokes are
  dark on white; inverted, as most few-shot pipelines feed it).

Rendering a split takes a few seconds; the result is cached in
``~/.cache/pymeta/glyphs-<split>-<hash>.npz`` (``$XDG_CACHE_HOME`` honoured), where the
hash covers every input that changes the pixels (seed, sizes, Pillow, FreeType and
matplotlib versions, the script table and render settings).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import unicodedata
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from torch import Tensor
from torch.utils.data import Dataset

from pymeta import _validate

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# (script, split, inclusive code point ranges). Order matters: a character is dropped
# when it looks like one listed before it, so train scripts come first and val/test
# keep only characters that are new relative to everything before them.
SCRIPTS: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...] = (
    ("Latin", "train", ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A))),
    ("Greek", "train", ((0x391, 0x3A9), (0x3B1, 0x3C9))),
    ("Cyrillic", "train", ((0x400, 0x45F),)),
    ("IPA", "train", ((0x250, 0x2AF),)),
    ("Armenian", "train", ((0x531, 0x587),)),
    ("Canadian Syllabics", "train", ((0x1400, 0x167F),)),
    ("Arrows", "train", ((0x2190, 0x21FF),)),
    ("Math Operators", "train", ((0x2200, 0x22FF),)),
    ("Box Drawing", "train", ((0x2500, 0x257F),)),
    ("Georgian", "val", ((0x10A0, 0x10FF),)),
    ("Hebrew", "val", ((0x5D0, 0x5EA),)),
    ("Currency", "val", ((0x20A0, 0x20CF),)),
    ("Yijing Hexagrams", "val", ((0x4DC0, 0x4DFF),)),
    ("Arabic", "test", ((0x600, 0x6FF),)),
    ("Lao", "test", ((0xE80, 0xEFF),)),
    ("Braille", "test", ((0x2800, 0x28FF),)),
    ("Geometric Shapes", "test", ((0x25A0, 0x25FF),)),
)

# The "hands": matplotlib's DejaVu and STIX faces (file names in mpl-data/fonts/ttf).
FACES = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
)  # fmt: skip
MIN_FACES = 4  # fewer faces than this would make the "hands" of a class too alike

# Everything about the pixels; part of the cache key, so editing it re-renders.
RENDER = {
    "supersample": 3,  # draw at 3x and box-filter down: anti-aliased strokes
    "font_size": 0.8,  # em size as a fraction of the image side
    "fit": 0.85,  # glyphs larger than this fraction of the side are shrunk to it
    "rotation_deg": 10.0,  # small: arrows and syllabics differ from each other by rotation
    "scale": (0.85, 1.1),
    "shear": 0.1,
    "shift": 0.08,  # fraction of the side
    "min_ink": 10.0,  # ink (sum of [0, 1] pixels at 28x28) below which a glyph is unreadable
    "duplicate_rms": 0.04,  # RMS pixel difference at 28x28 under which two characters are one
    "canonical_faces": ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "STIXGeneral"),
}
_CANONICAL_SIZE = 28  # the class list is decided at one size, so it is the same for every image_size
_FORMAT = 1  # bump when the cache file layout changes


def _font_dir() -> Path:
    import matplotlib  # a dependency of pymeta: its font files are the "hands"

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _font(face: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / f"{face}.ttf"), size)


@functools.cache
def _coverage() -> dict[str, frozenset[int]]:
    """Code points each face has a real glyph for (glyph index 0 is "missing glyph")."""
    from matplotlib.ft2font import FT2Font

    directory = _font_dir()
    return {
        face: frozenset(c for c, glyph in FT2Font(str(directory / f"{face}.ttf")).get_charmap().items() if glyph)
        for face in FACES
    }


def _draw(char: str, face: str, side: int) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """``char`` in ``face`` drawn white-on-black at the centre of a ``2 side`` square canvas.

    The canvas is twice the output side so wide glyphs are not clipped before fitting.
    Returns the canvas and its ink bounding box (None when nothing was drawn).
    """
    canvas = 2 * side
    img = Image.new("L", (canvas, canvas), 0)
    font = _font(face, max(1, round(RENDER["font_size"] * side)))
    ImageDraw.Draw(img).text((canvas / 2, canvas / 2), char, fill=255, font=font, anchor="mm")
    return img, img.getbbox()


def _place(
    img: Image.Image,
    bbox: tuple[int, int, int, int],
    side: int,
    angle: float = 0.0,
    scale: float = 1.0,
    shear: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """The ink of ``img`` centred in a ``side`` square under an affine jitter, box-filtered
    down by the supersampling factor: ``[side / supersample, side / supersample]`` uint8.

    The forward map is ``out = centre + shift + A (in - ink_centre)`` with
    ``A = scale * rotation(angle) @ shear``; PIL wants the inverse map, built here
    in closed form: ``A^-1 = shear^-1 @ rotation(-angle) / scale``.
    """
    left, top, right, bottom = bbox
    fit = min(1.0, RENDER["fit"] * side / max(right - left, bottom - top))
    cos, sin = math.cos(angle), math.sin(angle)
    inverse = np.array([[1.0, -shear], [0.0, 1.0]]) @ np.array([[cos, sin], [-sin, cos]]) / (scale * fit)
    out_centre = np.array([side / 2 + shift[0], side / 2 + shift[1]])
    offset = np.array([(left + right) / 2, (top + bottom) / 2]) - inverse @ out_centre
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    placed = img.transform((side, side), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(placed.reduce(RENDER["supersample"]))


@functools.cache
def catalog() -> tuple[tuple[str, str, int, tuple[str, ...]], ...]:
    """Every Glyphs class in order: ``(script, split, code point, faces that have it)``.

    Candidates are the letters, digits and symbols (Unicode categories L, N, S) of
    ``SCRIPTS`` with at least ``MIN_FACES`` faces; each is rendered once without jitter
    at 28x28 and kept only when it has enough ink and differs (RMS > ``duplicate_rms``)
    from every character kept before it.
    """
    coverage = _coverage()
    side = _CANONICAL_SIZE * RENDER["supersample"]
    candidates, images = [], []
    for script, split, ranges in SCRIPTS:
        for low, high in ranges:
            for code in range(low, high + 1):
                char = chr(code)
                faces = tuple(f for f in FACES if code in coverage[f])
                if unicodedata.category(char)[0] not in "LNS" or len(faces) < MIN_FACES:
                    continue
                face = next((f for f in RENDER["canonical_faces"] if f in faces), faces[0])
                img, bbox = _draw(char, face, side)
                if bbox is None:  # blank glyphs such as BRAILLE PATTERN BLANK
                    continue
                candidates.append((script, split, code, faces))
                images.append(_place(img, bbox, side).ravel() / 255.0)
    x = np.stack(images)
    ink = x.sum(1)
    sq = (x * x).sum(1)
    # Pairwise RMS differences through |a|^2 + |b|^2 - 2ab: one matmul, no [n, n, d] temporary.
    rms = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0) / x.shape[1])
    kept: list[int] = []
    for i in range(len(candidates)):
        if ink[i] < RENDER["min_ink"] or (kept and rms[i, kept].min() < RENDER["duplicate_rms"]):
            continue
        kept.append(i)
    return tuple(candidates[i] for i in kept)


def render_class(code: int, faces: tuple[str, ...], seed: int, examples: int, image_size: int) -> np.ndarray:
    """``examples`` jittered images of one character: ``[examples, image_size, image_size]`` uint8.

    Faces are used in turn, in a random order, so each appears ``examples / len(faces)``
    times (rounded). Every face of a :func:`catalog` entry maps the character to a real
    glyph, so each draws ink. Deterministic given ``(seed, code)``, independent of other
    classes.
    """
    rng = np.random.default_rng([seed, code])
    side = image_size * RENDER["supersample"]
    order = rng.permutation(len(faces))
    drawn = functools.cache(lambda face: _draw(chr(code), face, side))  # each face once, only if used
    low_scale, high_scale = RENDER["scale"]
    out = np.empty((examples, image_size, image_size), dtype=np.uint8)
    for j in range(examples):
        img, bbox = drawn(faces[order[j % len(faces)]])
        out[j] = _place(
            img,
            bbox,
            side,
            angle=math.radians(rng.uniform(-RENDER["rotation_deg"], RENDER["rotation_deg"])),
            scale=rng.uniform(low_scale, high_scale),
            shear=rng.uniform(-RENDER["shear"], RENDER["shear"]),
            shift=tuple(rng.uniform(-RENDER["shift"], RENDER["shift"], 2) * side),
        )
    return out


def default_root() -> Path:
    """``$XDG_CACHE_HOME/pymeta``, else ``~/.cache/pymeta``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pymeta"


class Glyphs(Dataset):
    """Few-shot character classification on rendered glyphs (see the module doc).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; disjoint scripts, hence characters.
        root: cache directory (default :func:`default_root`).
        image_size: side S of the square images.
        seed: seed of the per-example jitter; the same seed gives the same pixels.
        examples_per_class: images per character (Omniglot has 20).
        transform: optional callable applied to each image tensor ``[1, S, S]``.

    Items are ``(x, label)`` with ``x`` float32 ``[1, S, S]`` in [0, 1] (1 = ink) and
    ``label`` in ``0..num_classes-1``; examples are stored class by class.
    Attributes: ``labels`` (per example), ``class_names`` (``"Greek/GREEK SMALL
    LETTER ALPHA"``), ``characters`` (``"α"``), ``class_scripts``, ``scripts``,
    ``images`` (uint8 ``[N, S, S]``), ``cache_path``.
    """

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike[str] | None = None,
        image_size: int = 28,
        seed: int = 0,
        examples_per_class: int = 20,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.split = _validate.choice("split", split, SPLITS)
        self.image_size = _validate.positive_int("image_size", image_size)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 for characters to be legible, got {image_size}")
        self.seed = _validate.non_negative_int("seed", seed)
        self.examples_per_class = _validate.positive_int("examples_per_class", examples_per_class)
        self.transform = transform
        self.cache_path = Path(default_root() if root is None else root).expanduser() / self._cache_name()
        images, codes, names, scripts = self._load_or_render()
        self.images = torch.from_numpy(images)
        self.characters = [chr(c) for c in codes.tolist()]
        self.class_names = [str(n) for n in names]
        self.class_scripts = [str(s) for s in scripts]
        self.scripts = list(dict.fromkeys(self.class_scripts))
        self.labels = [i // examples_per_class for i in range(len(images))]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Example ``index``: ``(x [1, S, S] float32 in [0, 1], label)``."""
        x = self.images[index].unsqueeze(0).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]

    def _cache_name(self) -> str:
        import matplotlib

        key = {
            "format": _FORMAT,
            "split": self.split,
            "image_size": self.image_size,
            "seed": self.seed,
            "examples_per_class": self.examples_per_class,
            "render": RENDER,
            "scripts": SCRIPTS,
            "faces": FACES,
            "min_faces": MIN_FACES,
            "pillow": Image.__version__,
            "freetype": features.version("freetype2"),
            "matplotlib": matplotlib.__version__,
            "unicode": unicodedata.unidata_version,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return f"glyphs-{self.split}-{self.image_size}px-{digest}.npz"

    def _load_or_render(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.cache_path.exists():
            try:
                with np.load(self.cache_path, allow_pickle=False) as f:
                    return f["images"], f["codes"], f["names"], f["scripts"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                # A damaged cache (e.g. a disk that filled up) is re-rendered, not fatal.
                warnings.warn(f"re-rendering Glyphs: cannot read cache {self.cache_path}: {exc}", stacklevel=3)
        start = time.perf_counter()
        classes = [c for c in catalog() if c[1] == self.split]
        images = np.concatenate(
            [render_class(code, faces, self.seed, self.examples_per_class, self.image_size) for _, _, code, faces in classes]
        )
        codes = np.array([code for _, _, code, _ in classes], dtype=np.int64)
        names = np.array([f"{script}/{unicodedata.name(chr(code))}" for script, _, code, _ in classes])
        scripts = np.array([script for script, _, _, _ in classes])
        self._write_cache(images=images, codes=codes, names=names, scripts=scripts)
        logger.info(
            "rendered Glyphs %s: %d classes x %d examples in %.1fs -> %s",
            self.split, len(classes), self.examples_per_class, time.perf_counter() - start, self.cache_path,
        )
        return images, codes, names, scripts

    def _write_cache(self, **arrays: np.ndarray) -> None:
        """Write the cache atomically: a temp file in the same directory, then ``os.replace``.

        Concurrent processes (DataLoader workers, parallel test runs) then see either no
        file or a complete one, never a half-written archive.
        """
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=self.cache_path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.cache_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
