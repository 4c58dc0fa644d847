"""Checkpoints that are written atomically, verified when read, and never run code.

* Atomic: a crash mid-write never destroys the last good checkpoint (temp file in the
  same folder, fsync, rename). A temp file left by a killed writer
  (``.NAME.<pid>@<host>.XXXXXXXX.tmp``) is removed by the next :func:`save` to the same
  path once its process is gone.
* Verified: the payload is stored with its SHA-256, checked by :func:`load`, so a bit
  flipped on disk or in a copy is an error, not a model with a weight of 1e22 (the zip
  container's CRCs are not checked when PyTorch reads it).
* Safe: files are read with ``torch.load(weights_only=True)``, PyTorch's restricted
  unpickler (the default since PyTorch 2.6, see the ``torch.load`` documentation), so a
  checkpoint from someone else cannot execute code. Payloads therefore hold only
  tensors, numbers, strings, ``None`` and lists, tuples and dicts of them.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pymeta import _leftovers

FORMAT = "pymeta-checkpoint"
VERSION = 2
# A temp file not written to for this long belongs to no running save.
STALE_TEMP_SECONDS = 3600.0
# What a format-1 checkpoint (pymeta before checksums) pickled besides the safe types:
# the numpy RNG state.
_FORMAT_1_GLOBALS = re.compile(r"numpy\.(ndarray|dtype|dtypes\.\w+|(_core|core)\.multiarray\._reconstruct)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, not pymeta's, unsafe, or from another config."""


def save(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, None, and lists / tuples / dicts of
    them) to ``path`` atomically, with its checksum.

    The temp file is fsynced before ``os.replace``, which is atomic on POSIX and
    Windows, so readers see either the old checkpoint or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    record = {
        "format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(),
        "payload": torch.frombuffer(body, dtype=torch.uint8),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_leftovers.owner_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed writers of checkpoint ``path`` left; return them.

    A temp file is stale when its owner process (named in it) is gone from this host,
    or nothing has written to it for :data:`STALE_TEMP_SECONDS`; another live run's
    temp file is left alone.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:({_leftovers.TAG_PATTERN})\.)?\w+\.tmp")
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if not match:
            continue
        try:
            stale = (match.group(1) and _leftovers.owner_gone(match.group(1))) or \
                _leftovers.age(candidate) > STALE_TEMP_SECONDS
            if stale:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:  # its writer finished (renamed it) meanwhile
            continue
    return removed


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save`; ``CheckpointError`` naming
    ``path`` when it is not one, is damaged, or would need to run code to be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    record = _restricted_load(path, path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pymeta checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {record.get('version')}; this pymeta reads format {VERSION}"
        )
    body, digest = record.get("payload"), record.get("sha256")
    if not (isinstance(body, torch.Tensor) and body.dtype == torch.uint8 and body.dim() == 1
            and isinstance(digest, str)):
        raise CheckpointError(f"checkpoint {path} is damaged: no payload with a checksum")
    data = body.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the checksum written with them "
            "(the file changed on disk or in a copy); use another checkpoint, e.g. the -last or best one"
        )
    payload = _restricted_load(io.BytesIO(data), path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: its payload is a {type(payload).__name__}, not a dict")
    return payload


def _restricted_load(source: Path | BinaryIO, path: Path) -> Any:
    """``torch.load(source, weights_only=True)`` with errors as ``CheckpointError`` naming ``path``."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not isinstance(source, Path):
            source.seek(0)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:
            unsafe = []
        if not unsafe:
            raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {_first_line(exc)}") from None
        if all(_FORMAT_1_GLOBALS.fullmatch(name) for name in unsafe):
            raise CheckpointError(
                f"{path} is a checkpoint of an older pymeta (format 1, which pickled numpy objects); this "
                f"pymeta reads only format {VERSION}, which it can load without running code: train again"
            ) from None
        raise CheckpointError(
            f"{path} was not loaded: reading it would call {', '.join(unsafe)}, i.e. run code from the "
            "file, which pymeta never does (only tensors, numbers and strings are read)"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n", 1)[0]
