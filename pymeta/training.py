"""Meta-training and evaluation loops behind the ``pymeta`` command.

Everything here is ordinary PyTorch: a learner (an ``nn.Module`` with ``episode``), a
``torch.optim`` optimizer, and an iterable of :class:`pymeta.data.Episode`. The command
line is a thin layer over :func:`train` and :func:`evaluate`.

Checkpoints (written atomically, by rank 0 only): at every validation ``train`` writes
``<out stem>-last<suffix>`` (e.g. ``runs/pymeta-last.pt``), and ``out`` itself whenever
the validation metric improves (the best model). Both hold everything a resumed run
needs: model, optimizer (and its learning-rate schedule), the training batches' stream
state, the torch / numpy / python RNG states, the execution strategies the learner
chose, step, history and config. ``train(config, resume=path)`` (``pymeta train ... --resume path``) continues
from either and reproduces the uninterrupted run exactly (same losses, same
parameters), provided the execution strategy is fixed or was already chosen when the
checkpoint was written: ``strategy="auto"`` picks by timing, so two separate runs may
pick differently and differ by rounding.

Inside a ``torch.distributed`` process group (``pymeta train --nproc N``, or torchrun),
:func:`train` and :func:`evaluate` shard every batch's tasks across the ranks (see
:mod:`pymeta.distributed`): same loop, same results up to rounding.
"""

from __future__ import annotations

import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pymeta import _settings, _validate, checkpoint, distributed
from pymeta.algorithms import LEARNERS, Learner
from pymeta.algorithms.base import Batches
from pymeta.core.batched import strategy_pickers
from pymeta.core.norms import has_batch_norm
from pymeta.cuda_graph import CUDAGraphStep
from pymeta.data import Episode
from pymeta.data._stream import batch_generator

DATASETS: dict[str, Callable[[TrainConfig], DataSpec]] = {}


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
    # Run each training step under torch.compile (pymeta.training.compiled_step).
    compile: bool = False

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in from the dataset's defaults."""
        kind = self.data.split(":", 1)[0]
        if kind not in DATA_DEFAULTS:
            raise ValueError(f"data must be one of {sorted(DATASETS)} or folder:PATH, got {self.data!r}")
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


@dataclass
class DataSpec:
    """What an algorithm builder needs to know about the data."""

    train: Batches  # the training episodes (an EpisodeStream)
    make_train_dataset: Callable[[], Any] | None  # base classes (x, label) for pre-training
    make_eval: Callable[[str, int], Iterator[Episode]]  # (split, seed) -> episodes
    task: str  # "regression" or "classification"
    example_shape: tuple[int, ...]
    out_features: int
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default=F.mse_loss)
    # split -> its class dataset of (x, label), for learners that draw their own batches
    make_dataset: Callable[[str], Any] | None = None

    def backbone(self, n_out: int | str | None = "head") -> nn.Module:
        """The standard network for the data: MLP 1-40-40-1 for regression, conv4 for images.

        ``n_out="head"``: a classifier with one output per way; ``None``: the encoder only.
        """
        from pymeta import models

        if self.task == "regression":
            return models.mlp(self.example_shape[0], (40, 40), self.out_features)
        n_out = self.out_features if n_out == "head" else n_out
        return models.conv4(in_channels=self.example_shape[0], n_way=n_out, image_size=self.example_shape[-1])


@dataclass
class Stats:
    """Mean of a per-task metric with the half-width of its 95% confidence interval."""

    mean: float
    ci95: float
    tasks: int
    columns: tuple[Stats, ...] = ()  # of a metric with K values per task, each column's

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.ci95:.4f} (95% CI, {self.tasks} tasks)"


def confidence(values: Tensor) -> Stats:
    """Normal-approximation 95% CI of the mean of ``values: [N]``; for ``[N, K]`` (K values
    per task), of the row means, with each column's statistics in ``columns``."""
    values = values.double()
    if values.dim() == 2:
        return replace(confidence(values.mean(1)), columns=tuple(confidence(column) for column in values.T))
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return Stats(values.mean().item(), 1.96 * std / math.sqrt(n), n)


def learner_step(learner: Learner, batch: Any, spec: DataSpec) -> float | None:
    """One outer step of ``learner`` (:meth:`Learner.train_step`); the loss as a float."""
    loss = learner.train_step(batch, spec.loss_fn)
    return None if loss is None else loss.item()


class CompiledStep:
    """:meth:`Learner.train_step` under ``torch.compile`` (``pymeta train --compile``).

    Dynamo traces the learner's loss into one graph (the inner loop included: pymeta's
    engine takes its inner gradients with ``torch.func.grad`` when traced) and breaks
    the graph at ``loss.backward()``, which then runs the compiled backward. The first
    step compiles (tens of seconds on a CPU); later steps of the same shapes reuse it.
    """

    def __init__(self) -> None:
        self.compiled: Callable[[Any, Any], Tensor | None] | None = None

    def __call__(self, learner: Learner, batch: Any, spec: DataSpec) -> float | None:
        if self.compiled is None:
            self.compiled = torch.compile(learner.train_step)
        loss = self.compiled(batch, spec.loss_fn)
        return None if loss is None else loss.item()


class GraphedEpisodeStep:
    """The episode step captured as a CUDA graph on the first batch, then replayed
    (:class:`pymeta.CUDAGraphStep`; every later batch must have the first one's shapes)."""

    def __init__(self) -> None:
        self.graphed: CUDAGraphStep | None = None

    def __call__(self, learner: Learner, episode: Episode, spec: DataSpec) -> float:
        if self.graphed is None:
            self.graphed = CUDAGraphStep(learner, episode, loss_fn=spec.loss_fn)
        return self.graphed(*episode).item()


def evaluate(
    learner: Learner,
    episodes: Iterator[Episode],
    num_tasks: int,
    task: str,
    device: str = "cpu",
    progress: bool = False,
    desc: str = "eval",
) -> Stats:
    """Mean per-task metric (:meth:`Learner.task_metric`) over the first ``num_tasks`` tasks
    drawn from ``episodes`` (any batches with ``num_tasks``, e.g. :meth:`Learner.eval_batches`).

    The inner loop still takes gradients; only the outer graph is skipped. Inside a
    process group every rank must call it with the same ``episodes``: each evaluates
    its shard of every batch and all get the statistics over all ``num_tasks`` tasks.
    """
    _validate.positive_int("num_tasks", num_tasks)
    metrics: list[Tensor] = []  # per batch: this rank's tasks' metrics [n_b]
    seen = 0
    bar = tqdm(total=num_tasks, desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        while seen < num_tasks:
            ep = next(episodes)
            keep = min(ep.num_tasks, num_tasks - seen)
            mine = distributed.shard_range(keep)
            if len(mine):
                local = distributed.take(ep, mine).to(device)
                metrics.append(learner.task_metric(local, task).cpu())
            else:  # the last batch can have fewer tasks left than there are ranks
                metrics.append(torch.empty(0, dtype=torch.float64))
            seen += keep
            bar.update(keep)
    bar.close()
    return confidence(distributed.gather_tasks(metrics))


def build(config: TrainConfig) -> tuple[nn.Module, DataSpec]:
    """Learner and data for a resolved config."""
    kind = config.data.split(":", 1)[0]
    spec = DATASETS[kind](config)
    torch.manual_seed(config.seed)
    learner = LEARNERS[config.algo].from_config(config, spec).to(config.device)
    return learner, spec


@dataclass
class Result:
    config: TrainConfig
    learner: nn.Module
    history: list[dict[str, float]]
    test: Stats
    test_before: Stats | None
    seconds: float
    checkpoint: Path
    losses: list[float]  # the outer loss of every step this call ran (none for Reptile)


def last_checkpoint_path(out: str | Path) -> Path:
    """Where :func:`train` writes the checkpoint of the latest validation: ``<stem>-last<suffix>``."""
    out = Path(out)
    return out.with_name(f"{out.stem}-last{out.suffix}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`train`; the message says where, and which checkpoint
    holds the latest state to ``resume`` from."""

    def __init__(self, position: Position) -> None:
        saved = "none yet" if position.checkpoint is None else f"{position.checkpoint} (step {position.saved_step})"
        super().__init__(f"interrupted {position.where}; last checkpoint: {saved}")
        self.position = position


@dataclass
class Position:
    """Where a :func:`train` call is: for the message of an :class:`Interrupted`."""

    where: str = "before the first step"
    checkpoint: Path | None = None  # the latest full training state (written or resumed from)
    saved_step: int | None = None


def train(
    config: TrainConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> Result:
    """Meta-train, keep the best checkpoint by validation, and report test statistics.

    Args:
        config: the run; ``None`` settings take the dataset's defaults.
        progress: show progress bars (rank 0 only).
        log: where the final report goes (rank 0 only).
        resume: a checkpoint written by an earlier run of the same config (only the
            :data:`RUN_FIELDS` may differ, e.g. more ``iterations``); training continues
            after its step exactly as the uninterrupted run would have.
        overwrite: replace checkpoints of another config at ``config.out`` (see
            :func:`check_out`).

    Inside a process group of N ranks every rank calls it with the same arguments:
    each batch's tasks are sharded, gradients all-reduced, and only rank 0 writes
    checkpoints, logs and shows progress. Ctrl-C raises :class:`Interrupted`.
    """
    position = Position()
    try:
        return _train(config, progress, log, resume, overwrite, position)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(position) from None


def _train(
    config: TrainConfig, progress: bool, log: Callable[[str], None], resume: str | Path | None, overwrite: bool,
    position: Position,
) -> Result:
    config = config.resolved()
    if distributed.rank() == 0:
        check_out(config, resume, overwrite)
    learner, spec = build(config)
    opt = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)
    source = LEARNERS[config.algo].training_batches(config, spec) or spec.train
    history: list[dict[str, float]] = []
    best: float | None = None
    best_model: dict[str, Tensor] | None = None
    running, first = math.nan, 1
    if resume is not None:
        state = resume_state(resume, config)
        load_model(learner, state["model"], resume)
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"checkpoint {resume}: optimizer state does not match: {exc}") from exc
        source.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        for name, picker in strategy_pickers(learner).items():
            picker.chosen = state["strategies"].get(name) or picker.chosen
        history, best, running, first = state["history"], state["best_val"], state["running"], state["step"] + 1
        best_model = state.get("best_model", state["model"])
        position.checkpoint, position.saved_step = Path(resume), state["step"]
    # The learner's outer learning-rate schedule (MAML++: cosine annealing), if any.
    scheduler = learner.outer_lr_scheduler(opt, config.iterations, state.get("scheduler") if resume is not None else None)
    # Every rank starts from rank 0's weights, even if a user's builder is not seeded.
    distributed.broadcast_parameters(learner)
    main = distributed.rank() == 0
    higher_is_better = spec.task == "classification"
    train_step = GraphedEpisodeStep() if config.cuda_graph else CompiledStep() if config.compile else learner_step
    batches = iter(source)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(first, config.iterations + 1), desc=f"{config.algo} on {config.data}",
               initial=first - 1, total=config.iterations, disable=not (progress and main))
    for step in bar:
        position.where = f"at step {step}"
        batch = next(batches)
        total = len(batch[0])
        if distributed.is_active():
            batch = distributed.shard(batch)
        batch = batch.to(config.device)
        opt.zero_grad(set_to_none=True)
        learner.set_progress(step, config.iterations)
        loss = train_step(learner, batch, spec)
        if distributed.is_active():
            loss = distributed.all_reduce_grads(learner, len(batch[0]), total, loss)
        if config.check_finite:
            check_finite_update(learner, loss, step)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if loss is not None:
            losses.append(loss)
            running = loss if math.isnan(running) else 0.95 * running + 0.05 * loss
        bar.set_postfix(meta_loss=f"{running:.4f}")
        if step % config.val_every == 0 or step == config.iterations:
            val = evaluate(learner, eval_batches(config, spec, "val", config.seed + 1), config.val_episodes, spec.task,
                           config.device)
            history.append({"step": step, "meta_loss": running, "val": val.mean, "val_ci95": val.ci95})
            improved = best is None or (val.mean > best if higher_is_better else val.mean < best)
            if improved:
                best = val.mean
                best_model = {k: v.detach().clone() for k, v in learner.state_dict().items()}
            if main:
                state = {
                    "config": config.to_dict(), "model": learner.state_dict(), "optimizer": opt.state_dict(),
                    "step": step, "history": history, "best_val": best, "running": running,
                    "data": source.state_dict(), "rng": _rng_state(),
                    "strategies": {name: p.chosen for name, p in strategy_pickers(learner).items()},
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                }
                if improved:
                    checkpoint.save(config.out, state)
                checkpoint.save(last_checkpoint_path(config.out), {**state, "best_model": best_model})
                position.checkpoint, position.saved_step = last_checkpoint_path(config.out), step
            bar.set_postfix(meta_loss=f"{running:.4f}", val=f"{val.mean:.4f}", best=f"{best:.4f}")
    bar.close()
    position.where = "in the final test evaluation"
    seconds = time.perf_counter() - start
    # Report the test metric of the best (kept) model, not of the last step.
    learner.load_state_dict(best_model)
    test, before = evaluate_test(learner, spec, config, progress and main)
    if main:
        log(report_line(config, spec, test, before, learner))
    return Result(config, learner, history, test, before, seconds, Path(config.out), losses)


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


def check_finite_update(learner: nn.Module, loss: float | None, step: int) -> None:
    """Raise ``FloatingPointError`` before an optimizer step that would write NaN/inf.

    Checks the outer ``loss`` and every ``.grad`` of ``learner`` (one sync for all).
    """
    if loss is not None and not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: the meta-loss is non-finite ({loss}); parameters not updated")
    grads = {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}
    if not grads:
        return
    finite = torch.stack([g.isfinite().all() for g in grads.values()])
    if not finite.all():
        name = list(grads)[int((~finite).nonzero()[0])]
        raise FloatingPointError(f"step {step}: the meta-gradient of {name!r} is non-finite; parameters not updated")


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


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss"]))


def eval_batches(config: TrainConfig, spec: DataSpec, split: str, seed: int) -> Iterator[Any]:
    """The evaluation batches of ``split`` for the run's learner (:meth:`Learner.eval_batches`)."""
    return LEARNERS[config.algo].eval_batches(config, spec, split, seed) or spec.make_eval(split, seed)


def evaluate_test(
    learner: Learner, spec: DataSpec, config: TrainConfig, progress: bool
) -> tuple[Stats, Stats | None]:
    """Test statistics after adaptation and, for learners that take inner steps, before it."""
    adapts = learner.inner_steps is not None
    if adapts:
        learner.inner_steps = config.eval_inner_steps
    test = evaluate(learner, eval_batches(config, spec, "test", config.seed + 2), config.eval_episodes, spec.task,
                    config.device, progress, "test")
    before = None
    if adapts:
        learner.inner_steps = 0
        before = evaluate(learner, eval_batches(config, spec, "test", config.seed + 2), config.eval_episodes,
                          spec.task, config.device, progress, "test (no adaptation)")
        learner.inner_steps = config.inner_steps
    return test, before


def report_line(
    config: TrainConfig, spec: DataSpec, test: Stats, before: Stats | None, learner: nn.Module | None = None
) -> str:
    """The test report (``learner.test_report`` if it has its own); with a ``learner`` that
    has BatchNorm, also the normalisation policy the evaluation used (:func:`evaluate`
    runs learners in train mode)."""
    own = learner.test_report(config, test, before) if isinstance(learner, Learner) else None
    if own is not None:
        return own
    metric = "accuracy" if spec.task == "classification" else "MSE"
    shots = f"{config.ways}-way {config.shots}-shot" if spec.task == "classification" else f"{config.shots}-shot"
    if before is None:  # no inner loop (ProtoNet): nothing adapts
        report = f"test {metric} ({shots}): {test}"
    else:
        steps = config.eval_inner_steps
        report = (f"test {metric} after adaptation ({shots}, {steps} step{'' if steps == 1 else 's'}): {test}"
                  f"\ntest {metric} before adaptation: {before}")
    if learner is not None and has_batch_norm(learner):
        report += ("\nBatchNorm: per-task batch statistics of each task's examples "
                   "(transductive, as the papers' reference code evaluates)")
    return report


def load_learner(path: str | Path, device: str | None = None) -> tuple[nn.Module, DataSpec, TrainConfig]:
    """Rebuild the learner of a checkpoint with its trained weights."""
    payload = checkpoint.load(path)
    config = TrainConfig.from_checkpoint(payload, path, device)
    if "model" not in payload:
        raise checkpoint.CheckpointError(f"checkpoint {path} holds no model weights (no 'model' entry)")
    learner, spec = build(config)
    load_model(learner, payload["model"], path)
    return learner, spec, config


# ------------------------------------------------------------------ registrations
def _sinusoid(config: TrainConfig) -> DataSpec:
    from pymeta.data import Sinusoid

    def stream(seed: int) -> Sinusoid:
        return Sinusoid(k_shot=config.shots, q_queries=config.queries, meta_batch=config.meta_batch, seed=seed)

    return DataSpec(
        train=stream(config.seed), make_train_dataset=None, make_eval=lambda split, seed: iter(stream(seed)),
        task="regression", example_shape=(1,), out_features=1, loss_fn=F.mse_loss,
    )


SPLITS = ("train", "val", "test")


def _classification(config: TrainConfig, dataset: Callable[[str], Any]) -> DataSpec:
    """N-way K-shot episodes over the train / val / test class splits of ``dataset``.

    Every split is loaded and checked now, before any training: all give examples of
    one shape, and each has enough classes with enough examples for the episodes.
    """
    from pymeta.data import TaskSampler

    splits = {split: dataset(split) for split in SPLITS}
    shapes = {split: tuple(data[0][0].shape) for split, data in splits.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{split} {list(shape)}" for split, shape in shapes.items())
        raise ValueError(f"the splits of --data {config.data} hold examples of different shapes ({listing}); "
                         "a model takes one shape")

    def stream(split: str, seed: int) -> TaskSampler:
        try:
            return TaskSampler(splits[split], config.ways, config.shots, config.queries, config.meta_batch, seed)
        except ValueError as exc:
            raise ValueError(f"the {split} split of --data {config.data} is too small for --ways {config.ways} "
                             f"--shots {config.shots} --queries {config.queries}: {exc}") from None

    for split in SPLITS[1:]:
        stream(split, 0)
    return DataSpec(
        train=stream("train", config.seed), make_train_dataset=lambda: splits["train"],
        make_eval=lambda split, seed: iter(stream(split, seed)), task="classification",
        example_shape=shapes["train"], out_features=config.ways, loss_fn=F.cross_entropy,
        make_dataset=lambda split: splits[split],
    )


def _glyphs(config: TrainConfig) -> DataSpec:
    from pymeta.data import Glyphs

    return _classification(config, lambda split: Glyphs(split, seed=config.seed))


def _folder(config: TrainConfig) -> DataSpec:
    """Image folders, every file verified once (cached) and unusable ones left out with a
    warning; val and test read with the train split's channels and size."""
    from pymeta.data import ImageFolderClasses

    root = config.data.split(":", 1)[1]
    if not root:
        raise ValueError("data folder:PATH needs a path, e.g. --data folder:/data/omniglot")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"data folder not found: {root_path}")
    progress = distributed.rank() == 0
    train = ImageFolderClasses(root_path, split="train", verify=True, progress=progress)

    @functools.cache  # val may fall back to test: load each split once
    def split_of(split: str) -> Any:
        if split == "train":
            return train
        try:
            data = ImageFolderClasses(root_path, split, image_size=train.image_size, verify=True, progress=progress)
        except FileNotFoundError:
            if split != "val":
                raise
            # Omniglot ships no validation split: validate on the test classes then.
            return split_of("test")
        if data.grayscale != train.grayscale:
            kinds = {True: "grayscale", False: "colour"}
            warnings.warn(f"the {split} split of {root_path} holds {kinds[data.grayscale]} images, the train split "
                          f"{kinds[train.grayscale]} ones: reading {split} as {kinds[train.grayscale]}, like train",
                          stacklevel=2)
            data.grayscale = train.grayscale
        return data

    return _classification(config, split_of)


class Batch(NamedTuple):
    """A supervised batch ``x [B, ...]``, ``y [B]``, with ``.to(device)`` like :class:`Episode`."""

    x: Tensor
    y: Tensor

    def to(self, device: str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device))


class ShuffledBatches:
    """Endless shuffled mini-batches :class:`Batch` of a map-style ``(x, label)`` dataset.

    Full batches of ``batch_size`` in a fresh random order each epoch; epoch ``e``'s
    order is drawn from ``(seed, e)`` alone, so the state is one counter (resumable
    like an ``EpisodeStream``).
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int) -> None:
        self.dataset = dataset
        self.batch_size = _validate.positive_int("batch_size", batch_size)
        if len(dataset) < batch_size:
            raise ValueError(f"batch_size must be <= the dataset size {len(dataset)}, got {batch_size}")
        self.seed = seed
        self._batches = 0

    def __iter__(self) -> Iterator[Batch]:
        per_epoch = len(self.dataset) // self.batch_size
        while True:
            epoch, index = divmod(self._batches, per_epoch)
            order = torch.randperm(len(self.dataset), generator=batch_generator(self.seed, epoch))
            self._batches += 1
            chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
            xs, ys = zip(*(self.dataset[int(i)] for i in chosen), strict=True)
            yield Batch(torch.stack(xs), torch.as_tensor(ys))

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches": self._batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed = _validate.non_negative_int("seed", state["seed"])
        self._batches = _validate.non_negative_int("batches", state["batches"])


DATASETS["sinusoid"] = _sinusoid
DATASETS["glyphs"] = _glyphs
DATASETS["folder"] = _folder


def plot_history(
    history: list[dict[str, float]], path: str | Path, title: str = "", test: Stats | None = None,
    columns: str = "position",
) -> Path:
    """Write a PNG of the learning curves: running meta-loss and validation metric per step;
    with a ``test`` metric of K values per task, also each value's mean (``columns``: their
    axis label, e.g. MANN's instance of a class)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    panels = 3 if test is not None and test.columns else 2
    fig, (loss_ax, val_ax, *rest) = plt.subplots(1, panels, figsize=(5 * panels, 4))
    loss_ax.plot(steps, [h["meta_loss"] for h in history], marker="o")
    loss_ax.set(xlabel="meta-step", ylabel="meta-loss (running mean)", title="training")
    val = [h["val"] for h in history]
    ci = [h["val_ci95"] for h in history]
    val_ax.errorbar(steps, val, yerr=ci, marker="o", capsize=3)
    val_ax.set(xlabel="meta-step", ylabel="validation metric (95% CI)", title="validation")
    for ax in rest:
        positions = range(1, len(test.columns) + 1)
        ax.errorbar(positions, [c.mean for c in test.columns], yerr=[c.ci95 for c in test.columns], marker="o",
                    capsize=3)
        ax.set(xlabel=columns, ylabel="test metric (95% CI)", title=f"test ({test.tasks} tasks)", xticks=positions)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
