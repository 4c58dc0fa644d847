"""The meta-training loop: :func:`train` (validation, checkpoints, resume, Ctrl-C).

It talks to the algorithm only through the learner contract
(:mod:`pymeta.algorithms.base`): adding a learner needs no change here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pymeta import checkpoint, distributed
from pymeta.algorithms import LEARNERS
from pymeta.core.batched import strategy_pickers
from pymeta.training.config import TrainConfig
from pymeta.training.data import build
from pymeta.training.evaluation import Stats, eval_batches, evaluate, evaluate_test, report_line
from pymeta.training.state import (
    check_out,
    last_checkpoint_path,
    load_model,
    resume_state,
    rng_state,
    set_rng_state,
)
from pymeta.training.steps import (
    CompiledStep,
    GraphedEpisodeStep,
    check_finite_update,
    learner_step,
)


@dataclass
class Result:
    """What :func:`train` returns: the resolved config, the learner with its best weights,
    the validation history and the test statistics."""

    config: TrainConfig
    learner: nn.Module
    history: list[dict[str, float]]
    test: Stats
    test_before: Stats | None
    seconds: float
    checkpoint: Path
    losses: list[float]  # the outer loss of every step this call ran (none for Reptile)


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
        set_rng_state(state["rng"])
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
                    "data": source.state_dict(), "rng": rng_state(),
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
