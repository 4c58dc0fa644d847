"""What a run saves and restores: checkpoint paths, the checks before writing or resuming
one, the global RNG states, and rebuilding a trained learner from its checkpoint."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pymeta import _settings, checkpoint
from pymeta.training.config import RUN_FIELDS, TrainConfig
from pymeta.training.data import DataSpec, build


def last_checkpoint_path(out: str | Path) -> Path:
    """Where :func:`train` writes the checkpoint of the latest validation: ``<stem>-last<suffix>``."""
    out = Path(out)
    return out.with_name(f"{out.stem}-last{out.suffix}")


def check_out(config: TrainConfig, resume: str | Path | None = None, overwrite: bool = False) -> None:
    """Before a run writes ``config.out`` and its ``-last`` checkpoint: refuse to replace
    files that are not checkpoints of this run's config (unless ``overwrite``), and
    remove the temp files that killed writers of them left.

    A checkpoint of the same config (only :data:`RUN_FIELDS` differ), and the file a
    run resumes from, may be replaced.
    """
    for path in (Path(config.out), last_checkpoint_path(config.out)):
        checkpoint.remove_stale_temp_files(path)
        if overwrite or not path.exists() or (resume is not None and Path(resume).resolve() == path.resolve()):
            continue
        try:
            saved = TrainConfig.from_checkpoint(checkpoint.load(path), path, config.device).to_dict()
        except checkpoint.CheckpointError as exc:
            raise ValueError(f"{path} exists and is not a checkpoint this run may replace ({exc}); "
                             "pass --out PATH for this run, or --overwrite to replace it") from None
        diffs = _settings.differences(saved, config.to_dict(), RUN_FIELDS)
        if diffs:
            raise ValueError(f"{path} holds a checkpoint of another run ({'; '.join(diffs)}); "
                             "pass --out PATH for this run, or --overwrite to replace it")


def resume_state(path: str | Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to be a resumable state of the resolved ``config``.

    Raises ``CheckpointError`` for a missing training state (a file from an older
    pymeta) or a config that differs in anything but :data:`RUN_FIELDS`.
    """
    payload = checkpoint.load(path)
    missing = sorted({"model", "optimizer", "data", "rng", "strategies", "running", "step"} - set(payload))
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint {path} has no training state to resume from (missing {missing})")
    saved = TrainConfig.from_checkpoint(payload, path, config.device).to_dict()
    diffs = _settings.differences(saved, config.to_dict(), RUN_FIELDS)
    if diffs:
        raise checkpoint.CheckpointError(
            f"cannot resume from {path}: it was trained with another config ({'; '.join(diffs)}); "
            f"repeat the original options (only {', '.join(RUN_FIELDS)} may change)"
        )
    return payload


def load_model(learner: nn.Module, state: Mapping[str, Tensor], path: str | Path) -> None:
    """``learner.load_state_dict(state)``, as a ``CheckpointError`` naming ``path`` when it does not fit."""
    try:
        learner.load_state_dict(state)
    except RuntimeError as exc:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not match its config: {exc}") from exc


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, python) as tensors and numbers,
    which a checkpoint stores and loads without unpickling arbitrary objects."""
    np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"kind": np_kind, "key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the global RNG states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss"]))


def load_learner(path: str | Path, device: str | None = None) -> tuple[nn.Module, DataSpec, TrainConfig]:
    """Rebuild the learner of a checkpoint with its trained weights."""
    payload = checkpoint.load(path)
    config = TrainConfig.from_checkpoint(payload, path, device)
    if "model" not in payload:
        raise checkpoint.CheckpointError(f"checkpoint {path} holds no model weights (no 'model' entry)")
    learner, spec = build(config)
    load_model(learner, payload["model"], path)
    return learner, spec, config
