"""Few-shot image datasets stored as folders: Omniglot, miniImageNet and anything alike."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from pymeta import _validate
from pymeta.data import _images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Folder names that mean the same split, tried in order: the plain name, then
# Omniglot's background/evaluation sets (its standard train/test split). Any one of
# them may be passed as ``split``.
SPLIT_FOLDERS = {
    "train": ("train", "images_background", "background"),
    "val": ("val", "validation", "valid"),
    "test": ("test", "images_evaluation", "evaluation"),
}


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_tree(directory: Path) -> tuple[list[str], list[Path], list[int]]:
    """Classes = folders that directly contain images, at any depth, in sorted order.

    So both ``class/img.png`` (miniImageNet) and ``alphabet/character/img.png``
    (Omniglot) work; a class is named by its path relative to ``directory``.
    """
    names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    for current, dirs, files in os.walk(directory):
        # Sorted, hidden folders skipped: the same class order on every machine.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images = sorted(f for f in files if _is_image(f))
        if images:
            labels.extend([len(names)] * len(images))
            paths.extend(Path(current) / f for f in images)
            names.append(Path(current).relative_to(directory).as_posix())
    return names, paths, labels


def _read_csv(csv_path: Path, image_dir: Path) -> tuple[list[str], list[Path], list[int]]:
    """Ravi & Larochelle's miniImageNet split files: rows ``filename,label`` under ``images/``."""
    names: dict[str, int] = {}
    paths: list[Path] = []
    labels: list[int] = []
    with open(csv_path, newline="") as f:
        for row in csv.reader(f):
            if not row or row == ["filename", "label"]:
                continue
            filename, label = row[0], row[1]
            paths.append(image_dir / filename)
            labels.append(names.setdefault(label, len(names)))
    return list(names), paths, labels


def _list_dir(path: Path) -> str:
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    return ", ".join(entries[:20]) + (", ..." if len(entries) > 20 else "") if entries else "nothing"


def _index(root: Path, split: str | None) -> tuple[Path, list[str], list[Path], list[int]]:
    """The folder holding ``split``, and its class names, image paths and labels."""
    if split is None:
        return (root, *_scan_tree(root))
    aliases = next((names for names in SPLIT_FOLDERS.values() if split in names), ())
    candidates = tuple(dict.fromkeys((split, *aliases)))
    for name in candidates:
        if (root / name).is_dir():
            return (root / name, *_scan_tree(root / name))
    csv_path, image_dir = root / f"{split}.csv", root / "images"
    if csv_path.is_file():
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{str(csv_path)!r} lists images in {str(image_dir)!r}, which does not exist")
        return (image_dir, *_read_csv(csv_path, image_dir))
    raise FileNotFoundError(
        f"split {split!r} not found in {str(root)!r}: no folder named {', '.join(candidates)} and no "
        f"{split}.csv; the folder contains: {_list_dir(root)}"
    )


class ImageFolderClasses(Dataset):
    """Images in one folder per class, read lazily with Pillow.

    Layouts (``root`` is the dataset folder):

    * class folders at any depth: ``root/[split/]class/*.png`` or
      ``root/[split/]alphabet/character/*.png``; a class is a folder containing images.
    * Omniglot: ``root/images_background``, ``root/images_evaluation``; pick them
      with ``split="train"`` / ``"test"`` (or their own names).
    * miniImageNet as usually distributed: ``root/train``, ``root/val``, ``root/test``
      class folders, or Ravi & Larochelle's ``root/images/`` + ``root/{split}.csv``.

    ``split=None`` reads ``root`` itself as the class tree.

    Image modes: 8-bit ones through Pillow, 16-bit grayscale (16-bit PNGs) scaled by
    65535, 32-bit float in [0, 1]; any other mode is an error naming the file (see
    :mod:`pymeta.data._images`).

    Args:
        grayscale: one channel (True) or RGB (False); None decides from the images'
            modes: the majority of all images with ``verify=True``, else the first
            image's (Omniglot is grayscale, miniImageNet colour).
        image_size: side S every image is resized to (ignoring aspect ratio, as the
            standard miniImageNet pipelines do); None means 28 for grayscale (the
            Omniglot convention) and 84 for colour (miniImageNet).
        invert: ``1 - x``; use it on Omniglot (dark strokes on white) to match
            :class:`Glyphs`, where 1 = ink.
        transform: optional callable applied to each image tensor ``[C, S, S]``.
        verify: decode every image once now (with a progress bar; the result is cached,
            see :func:`pymeta.data._images.verify`) and leave out the files that cannot
            be used (unreadable, truncated, unsupported mode), with one warning naming
            them. Without it, such a file raises when it is first drawn, naming it.
        progress: show the verification's progress bar.

    Items are ``(x, label)``: ``x`` float32 ``[C, S, S]`` in [0, 1], ``label`` in
    ``0..num_classes-1``. Attributes: ``labels``, ``class_names``, ``paths``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        image_size: int | None = None,
        grayscale: bool | None = None,
        invert: bool = False,
        transform: Callable[[Tensor], Tensor] | None = None,
        verify: bool = False,
        progress: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {str(self.root)!r} does not exist (or is not a folder)")
        self.split = split
        self.directory, self.class_names, self.paths, self.labels = _index(self.root, split)
        if not self.paths:
            raise ValueError(
                f"no images found under {str(self.directory)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                f"in it and its subfolders; it contains: {_list_dir(self.directory)})"
            )
        modes = self._leave_out_unusable(progress) if verify else []
        if grayscale is None and modes:
            grayscale = 2 * sum(mode in _images.GRAYSCALE_MODES for mode in modes) > len(modes)
        elif grayscale is None:
            with Image.open(self.paths[0]) as first:
                grayscale = first.mode in _images.GRAYSCALE_MODES
        self.grayscale = grayscale
        self.image_size = (28 if grayscale else 84) if image_size is None else _validate.positive_int("image_size", image_size)
        self.invert = invert
        self.transform = transform

    def _leave_out_unusable(self, progress: bool) -> list[str]:
        """Verify every file, drop the unusable ones (and classes left empty); return the
        modes of the files kept."""
        bad, modes = _images.verify(self.paths, progress)
        if not bad:
            return modes
        listing = "; ".join(f"{path} ({why})" for path, why in list(bad.items())[:20])
        more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
        warnings.warn(f"left out {len(bad)} of {len(self.paths)} images under {self.directory} that cannot be "
                      f"used: {listing}{more}", stacklevel=3)
        keep = [i for i, path in enumerate(self.paths) if str(path) not in bad]
        if not keep:
            raise ValueError(f"no usable images under {str(self.directory)!r}: all {len(self.paths)} failed to read")
        used = sorted({self.labels[i] for i in keep})
        relabel = {old: new for new, old in enumerate(used)}
        self.class_names = [self.class_names[c] for c in used]
        self.paths = [self.paths[i] for i in keep]
        self.labels = [relabel[self.labels[i]] for i in keep]
        return [modes[i] for i in keep]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Example ``index``: ``(x [C, S, S] float32 in [0, 1], label)``, C = 1 or 3."""
        x = _images.read(self.paths[index], self.grayscale, self.image_size)
        if self.invert:
            x = 1.0 - x
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]
