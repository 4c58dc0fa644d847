"""The settings of a ``pymeta train`` run: :class:`TrainConfig`, its per-data defaults,
and which learners honour which optional settings (read from the learner registry)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pymeta import _settings, checkpoint
from pymeta.algorithms import LEARNERS, Learner


@dataclass
class TrainConfig:
    """Every setting of a run; stored in the checkpoint so ``eval`` rebuilds the same run.

    ``None`` means "the dataset's default" (see ``DATA_DEFAULTS``).
    """

    algo: str = "protonet"
    data: str = "glyphs"
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    meta_batch: int | None = None
    iterations: int | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    outer_lr: float | None = None
    first_order: bool = False
    strategy: str = "auto"
    seed: int = 0
    val_every: int | None = None
    val_episodes: int = 100
    eval_episodes: int = 600
    eval_inner_steps: int | None = None
    device: str = "cpu"
    out: str = "runs/pymeta.pt"
    # Raise on NaN/inf in inner-loop losses and gradients and in the meta-loss and
    # meta-gradients (one sync per step), instead of corrupting the meta-parameters.
    check_finite: bool = True
    # MAML / FOMAML / Meta-SGD memory options (see pymeta.MAML): take the meta-gradient
    # task_chunk tasks at a time; recompute second-order inner steps in backward.
    task_chunk: int | None = None
    checkpoint_steps: bool = False
    # Capture each meta-step (loss and backward) as a CUDA graph on the first batch and
    # replay it (pymeta.CUDAGraphStep); the learners' inner NaN/inf checks are then off
    # (they need the host), the outer one stays.
    cuda_graph: bool = False
    # Run each training step under torch.compile (pymeta.training.steps.CompiledStep).
    compile: bool = False

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in from the dataset's defaults."""
        kind = self.data.split(":", 1)[0]
        if kind not in DATA_DEFAULTS:
            raise ValueError(f"data must be one of {sorted(DATA_DEFAULTS)} or folder:PATH, got {self.data!r}")
        if self.algo not in LEARNERS:
            raise ValueError(f"algo must be one of {sorted(LEARNERS)}, got {self.algo!r}")
        for option, on in (("task_chunk", self.task_chunk is not None), ("checkpoint_steps", self.checkpoint_steps),
                           ("cuda_graph", self.cuda_graph)):
            algos = algos_with(option)
            if on and self.algo not in algos:
                raise ValueError(f"{option} only applies to algo {', '.join(algos)}, got algo {self.algo!r}")
        if self.checkpoint_steps and (self.first_order or self.algo == "fomaml"):
            raise ValueError("checkpoint_steps recomputes second-order inner steps; first-order MAML keeps no "
                             "graph to recompute (drop --checkpoint-steps)")
        if self.cuda_graph:
            self._check_cuda_graph()
        defaults = {**DATA_DEFAULTS[kind], **LEARNERS[self.algo].cli_defaults.get(kind, {})}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, default in defaults.items():
            if values[name] is None:
                values[name] = default
        if values["eval_inner_steps"] is None:
            values["eval_inner_steps"] = values["inner_steps"]
        if values["val_every"] is None and isinstance(values["iterations"], int):
            values["val_every"] = max(1, values["iterations"] // 10)
        _settings.check(values, kind, LEARNERS[self.algo].cli_tasks)
        return TrainConfig(**values)

    def _check_cuda_graph(self) -> None:
        if torch.device(self.device).type != "cuda":
            raise ValueError(f"cuda_graph captures CUDA graphs and needs a CUDA device, got device {self.device!r}")
        if self.checkpoint_steps:
            raise ValueError("cuda_graph and checkpoint_steps exclude each other: recomputed steps replay the RNG "
                             "state, which a CUDA graph capture cannot read")
        if self.compile:
            raise ValueError("cuda_graph and compile exclude each other: choose one way to run the step "
                             "(torch.compile(mode='reduce-overhead') also uses CUDA graphs)")

    @property
    def inner_check_finite(self) -> bool:
        """The learners' own NaN/inf checks: on with ``check_finite``, unless captured."""
        return self.check_finite and not self.cuda_graph

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, payload: Mapping[str, Any], path: str | Path, device: str | None = None) -> TrainConfig:
        """The resolved config stored in a checkpoint ``payload`` read from ``path``, to
        run on ``device`` (default: the checkpoint's)."""
        saved = payload.get("config")
        known = {f.name for f in fields(cls)}
        if not isinstance(saved, Mapping) or not set(saved) <= known:
            unknown = sorted(set(saved) - known) if isinstance(saved, Mapping) else saved
            raise checkpoint.CheckpointError(f"checkpoint {path} has an unreadable config (unknown {unknown!r})")
        try:
            return cls(**{**saved, **({} if device is None else {"device": device})}).resolved()
        except (TypeError, ValueError) as exc:
            raise checkpoint.CheckpointError(f"checkpoint {path} has an unusable config: {exc}") from None


# Settings a resumed run may change: they do not alter the training trajectory.
RUN_FIELDS = ("iterations", "val_every", "val_episodes", "eval_episodes", "eval_inner_steps", "device", "out",
              "check_finite", "cuda_graph", "compile")


DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    # The MAML paper's sinusoid setup (MLP 1-40-40-1, alpha=0.01, 25 tasks, K=10),
    # with Adam at 1e-3 for a budget that finishes in about a minute on 2 cores.
    "sinusoid": dict(
        ways=1, shots=10, queries=10, meta_batch=25, iterations=4000,
        inner_steps=1, inner_lr=0.01, outer_lr=1e-3,
    ),
    # Omniglot-style 5-way 1-shot. A conv4 forward+backward costs about 3 ms per 28x28
    # image on 2 busy CPU cores, so the defaults keep a step small (4 tasks x 30 images:
    # 5 queries per class instead of the ProtoNet paper's 15) and ProtoNet trains in a
    # few minutes; raise --queries / --meta-batch / --iterations on bigger machines.
    "glyphs": dict(
        ways=5, shots=1, queries=5, meta_batch=4, iterations=200,
        inner_steps=1, inner_lr=0.4, outer_lr=1e-3,
    ),
    "folder": dict(
        ways=5, shots=1, queries=15, meta_batch=8, iterations=2000,
        inner_steps=1, inner_lr=0.4, outer_lr=1e-3,
    ),
}


def trains_on_episodes(algo: str) -> bool:
    """Whether ``--algo`` trains on the meta-batches of episodes (whose tasks distributed
    training shares out), not on batches of its own (``Learner.training_batches``)."""
    return LEARNERS[algo].training_batches.__func__ is Learner.training_batches.__func__


def algos_with(option: str) -> list[str]:
    """The ``--algo`` names whose learner honours the run ``option`` (``Learner.cli_options``)."""
    return sorted(name for name, cls in LEARNERS.items() if option in cls.cli_options)
