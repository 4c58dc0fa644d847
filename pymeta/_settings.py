"""Checks of a training run's settings, before anything trains.

Every bad setting is a one-line ``ValueError`` (``TypeError`` for a wrong type) naming
the command-line option (``--shots``), the allowed values and the value given, so
``pymeta train`` fails at once with exit code 2 instead of crashing after the run or,
worse, training on a setting that means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# Data families of regression tasks: one function per task, no classes (no --ways).
REGRESSION_DATA = ("sinusoid",)

# (setting, smallest allowed value): integer settings.
_INTEGERS = (("shots", 1), ("queries", 1), ("meta_batch", 1), ("iterations", 1), ("inner_steps", 1),
             ("val_every", 1), ("val_episodes", 1), ("eval_episodes", 1), ("eval_inner_steps", 0), ("seed", 0))


def option(name: str) -> str:
    """The command-line option of setting ``name``: ``meta_batch`` -> ``--meta-batch``."""
    return "--" + name.replace("_", "-")


def check(values: Mapping[str, Any], kind: str, tasks: tuple[str, ...]) -> None:
    """Check the resolved settings ``values`` of a run on data family ``kind``, for an
    algorithm that learns the task families ``tasks`` (``Learner.cli_tasks``)."""
    algo = values["algo"]
    if kind in REGRESSION_DATA:
        if "regression" not in tasks:
            raise ValueError(
                f"--algo {algo} classifies, but --data {kind} is a regression family (each task is a function "
                "to fit, there are no classes): use --data glyphs or folder:PATH, or another --algo"
            )
        if values["ways"] != 1:  # the only value that means something: one function per task
            raise ValueError(
                f"--ways does not apply to --data {kind}, a regression family (each task is one function); "
                "leave it out"
            )
    elif "classification" not in tasks:
        raise ValueError(f"--algo {algo} fits regression tasks, but --data {kind} holds classification tasks")
    elif _integer("ways", values["ways"]) < 2:
        raise ValueError(f"--ways must be >= 2 (a task tells N classes apart), got {values['ways']}")
    for name, low in _INTEGERS:
        if _integer(name, values[name]) < low:
            raise ValueError(f"{option(name)} must be >= {low}, got {values[name]}")
    if values["task_chunk"] is not None and _integer("task_chunk", values["task_chunk"]) < 1:
        raise ValueError(f"--task-chunk must be >= 1, got {values['task_chunk']}")
    for name in ("inner_lr", "outer_lr"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{option(name)} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{option(name)} must be a finite number > 0, got {value}")
    device(values["device"])


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{option(name)} must be an integer, got {value!r}")
    return value


def device(name: object) -> torch.device:
    """``name`` as a torch device that exists here, else a ``ValueError`` saying why not."""
    try:
        parsed = torch.device(name)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {name!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(f"--device {name}: no CUDA device is visible to torch{build}; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        try:
            torch.empty(0, device=parsed)
        except Exception as exc:  # a device type this torch build or machine lacks
            reason = str(exc).strip().split("\n", 1)[0]
            raise ValueError(f"--device {name} cannot be used here: {reason}") from None
    return parsed


def differences(saved: Mapping[str, Any], now: Mapping[str, Any], ignore: Iterable[str]) -> list[str]:
    """``name=old in the checkpoint, new now`` for each setting (except ``ignore``) that differs."""
    skip = set(ignore)
    return [f"{name}={saved.get(name)!r} in the checkpoint, {value!r} now"
            for name, value in now.items() if name not in skip and saved.get(name) != value]
