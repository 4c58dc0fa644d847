"""Validation and test: per-task metrics over held-out tasks (sharded inside a process
group), their 95% confidence intervals, and the test report."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pymeta import _validate, distributed
from pymeta.algorithms import LEARNERS, Learner
from pymeta.core.norms import has_batch_norm
from pymeta.data import Episode
from pymeta.training.config import TrainConfig
from pymeta.training.data import DataSpec


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
