"""Meta-training and evaluation loops behind the ``pymeta`` command.

Everything here is ordinary PyTorch: a learner (an ``nn.Module`` with ``episode``), a
``torch.optim`` optimizer, and an iterable of :class:`pymeta.data.Episode`. The command
line is a thin layer over :func:`train` and :func:`evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pymeta import _validate, checkpoint
from pymeta.data import Episode

DATASETS: dict[str, Callable[[TrainConfig], DataSpec]] = {}


@dataclass
class Algorithm:
    """How the command builds and trains one algorithm.

    ``build(config, spec)`` returns the learner; ``train_step(learner, batch, spec)``
    computes and back-propagates one outer step's gradients (the optimizer steps after)
    and returns the loss to log, or None; ``batches(config, spec)`` gives what it trains
    on (default: the training episodes).
    """

    build: Callable[[TrainConfig, DataSpec], nn.Module]
    train_step: Callable[[nn.Module, Any, DataSpec], float | None] | None = None
    batches: Callable[[TrainConfig, DataSpec], Iterator[Any]] | None = None


ALGORITHMS: dict[str, Algorithm] = {}


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

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in from the dataset's defaults."""
        kind = self.data.split(":", 1)[0]
        if kind not in DATA_DEFAULTS:
            raise ValueError(f"data must be one of {sorted(DATASETS)} or folder:PATH, got {self.data!r}")
        defaults = {**DATA_DEFAULTS[kind], **ALGO_DEFAULTS.get(self.algo, {}).get(kind, {})}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, default in defaults.items():
            if values[name] is None:
                values[name] = default
        if values["eval_inner_steps"] is None:
            values["eval_inner_steps"] = values["inner_steps"]
        if values["val_every"] is None:
            values["val_every"] = max(1, values["iterations"] // 10)
        return TrainConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    # The MAML paper's sinusoid setup (MLP 1-40-40-1, alpha=0.01, 25 tasks, K=10),
    # with Adam at 1e-3 for a budget that finishes in about a minute on 2 cores.
    "sinusoid": dict(
        ways=1, shots=10, queries=10, meta_batch=25, iterations=4000,
        inner_steps=1, inner_lr=0.01, outer_lr=1e-3,
    ),
    # Omniglot-style 5-way 1-shot with 15 queries per class, as in the ProtoNet paper;
    # a budget that trains ProtoNet in a few minutes on 2 CPU cores.
    "glyphs": dict(
        ways=5, shots=1, queries=15, meta_batch=8, iterations=600,
        inner_steps=1, inner_lr=0.4, outer_lr=1e-3,
    ),
    "folder": dict(
        ways=5, shots=1, queries=15, meta_batch=8, iterations=2000,
        inner_steps=1, inner_lr=0.4, outer_lr=1e-3,
    ),
}
# Per-algorithm overrides of the dataset defaults: {algo: {data: {name: value}}}.
ALGO_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # Reptile: several first-order steps on all of a task's examples (Nichol et al. 2018).
    "reptile": {"sinusoid": dict(inner_steps=5, inner_lr=0.02), "glyphs": dict(inner_steps=5, inner_lr=0.1)},
    # FineTune: pre-training batches of meta_batch * ways * (shots + queries) images, then
    # 100 full-batch SGD steps of a zero-initialised head per task.
    "finetune": {"glyphs": dict(inner_steps=100, inner_lr=0.5), "folder": dict(inner_steps=100, inner_lr=0.5)},
}


@dataclass
class DataSpec:
    """What an algorithm builder needs to know about the data."""

    train: Iterator[Episode]
    make_train_dataset: Callable[[], Any] | None  # base classes (x, label) for pre-training
    make_eval: Callable[[str, int], Iterator[Episode]]  # (split, seed) -> episodes
    task: str  # "regression" or "classification"
    example_shape: tuple[int, ...]
    out_features: int
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default=F.mse_loss)


@dataclass
class Stats:
    """Mean of a per-task metric with the half-width of its 95% confidence interval."""

    mean: float
    ci95: float
    tasks: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.ci95:.4f} (95% CI, {self.tasks} tasks)"


def confidence(values: Tensor) -> Stats:
    """Normal-approximation 95% CI of the mean of ``values: [N]``."""
    values = values.double()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return Stats(values.mean().item(), 1.96 * std / math.sqrt(n), n)


def meta_loss(learner: nn.Module, episode: Episode, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Mean query loss over all tasks and queries of one episode batch."""
    pred = learner.episode(episode.support_x, episode.support_y, episode.query_x)
    return loss_fn(pred.flatten(0, 1), episode.query_y.flatten(0, 1))


def episode_step(learner: nn.Module, episode: Episode, spec: DataSpec) -> float:
    """The default outer step: query loss of the adapted learners, back-propagated."""
    loss = meta_loss(learner, episode, spec.loss_fn)
    loss.backward()
    return loss.item()


def task_metric(pred: Tensor, target: Tensor, task: str) -> Tensor:
    """Per-task metric ``[T]``: accuracy for classification, MSE for regression."""
    if task == "classification":
        return (pred.argmax(-1) == target).double().mean(1)
    return (pred - target).square().flatten(1).mean(1).double()


def evaluate(
    learner: nn.Module,
    episodes: Iterator[Episode],
    num_tasks: int,
    task: str,
    device: str = "cpu",
    progress: bool = False,
    desc: str = "eval",
) -> Stats:
    """Mean per-task metric over ``num_tasks`` tasks drawn from ``episodes``.

    The inner loop still takes gradients; only the outer graph is skipped.
    """
    _validate.positive_int("num_tasks", num_tasks)
    metrics: list[Tensor] = []
    seen = 0
    bar = tqdm(total=num_tasks, desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        while seen < num_tasks:
            ep = next(episodes).to(device)
            pred = learner.episode(ep.support_x, ep.support_y, ep.query_x)
            metrics.append(task_metric(pred, ep.query_y, task)[: num_tasks - seen].cpu())
            seen += metrics[-1].numel()
            bar.update(metrics[-1].numel())
    bar.close()
    return confidence(torch.cat(metrics))


def build(config: TrainConfig) -> tuple[nn.Module, DataSpec]:
    """Learner and data for a resolved config."""
    kind = config.data.split(":", 1)[0]
    if config.algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {sorted(ALGORITHMS)}, got {config.algo!r}")
    spec = DATASETS[kind](config)
    torch.manual_seed(config.seed)
    learner = ALGORITHMS[config.algo].build(config, spec).to(config.device)
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


def train(config: TrainConfig, progress: bool = True, log: Callable[[str], None] = print) -> Result:
    """Meta-train, keep the best checkpoint by validation, and report test statistics."""
    config = config.resolved()
    learner, spec = build(config)
    opt = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)
    history: list[dict[str, float]] = []
    best: float | None = None
    higher_is_better = spec.task == "classification"
    start = time.perf_counter()
    algorithm = ALGORITHMS[config.algo]
    batches = algorithm.batches(config, spec) if algorithm.batches else spec.train
    train_step = algorithm.train_step or episode_step
    bar = tqdm(range(1, config.iterations + 1), desc=f"{config.algo} on {config.data}", disable=not progress)
    running = math.nan
    for step in bar:
        batch = next(batches).to(config.device)
        opt.zero_grad(set_to_none=True)
        loss = train_step(learner, batch, spec)
        opt.step()
        if loss is not None:
            running = loss if math.isnan(running) else 0.95 * running + 0.05 * loss
        bar.set_postfix(meta_loss=f"{running:.4f}")
        if step % config.val_every == 0 or step == config.iterations:
            val = evaluate(learner, spec.make_eval("val", config.seed + 1), config.val_episodes, spec.task, config.device)
            history.append({"step": step, "meta_loss": running, "val": val.mean, "val_ci95": val.ci95})
            improved = best is None or (val.mean > best if higher_is_better else val.mean < best)
            if improved:
                best = val.mean
                checkpoint.save(config.out, {
                    "config": config.to_dict(), "model": learner.state_dict(),
                    "optimizer": opt.state_dict(), "step": step, "history": history, "best_val": best,
                })
            bar.set_postfix(meta_loss=f"{running:.4f}", val=f"{val.mean:.4f}", best=f"{best:.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    # Report the test metric of the best (kept) checkpoint, not of the last step.
    learner.load_state_dict(checkpoint.load(config.out)["model"])
    test, before = evaluate_checkpointed(learner, spec, config, progress)
    log(report_line(config, spec, test, before))
    return Result(config, learner, history, test, before, seconds, Path(config.out))


def evaluate_checkpointed(
    learner: nn.Module, spec: DataSpec, config: TrainConfig, progress: bool
) -> tuple[Stats, Stats | None]:
    """Test statistics after adaptation and, for gradient-based learners, before it."""
    if hasattr(learner, "steps"):
        learner.steps = config.eval_inner_steps
    test = evaluate(learner, spec.make_eval("test", config.seed + 2), config.eval_episodes, spec.task,
                    config.device, progress, "test")
    before = None
    if hasattr(learner, "steps"):
        learner.steps = 0
        before = evaluate(learner, spec.make_eval("test", config.seed + 2), config.eval_episodes, spec.task,
                          config.device, progress, "test (no adaptation)")
        learner.steps = config.inner_steps
    return test, before


def report_line(config: TrainConfig, spec: DataSpec, test: Stats, before: Stats | None) -> str:
    metric = "accuracy" if spec.task == "classification" else "MSE"
    shots = f"{config.ways}-way {config.shots}-shot" if spec.task == "classification" else f"{config.shots}-shot"
    line = f"test {metric} after adaptation ({shots}, {config.eval_inner_steps} steps): {test}"
    if before is not None:
        line += f"\ntest {metric} before adaptation: {before}"
    return line


def load_learner(path: str | Path, device: str | None = None) -> tuple[nn.Module, DataSpec, TrainConfig]:
    """Rebuild the learner of a checkpoint with its trained weights."""
    payload = checkpoint.load(path)
    config = TrainConfig(**payload["config"])
    if device is not None:
        config.device = device
    learner, spec = build(config)
    try:
        learner.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not match its config: {exc}") from exc
    return learner, spec, config


# ------------------------------------------------------------------ registrations
def _sinusoid(config: TrainConfig) -> DataSpec:
    from pymeta.data import Sinusoid

    def episodes(seed: int) -> Iterator[Episode]:
        return iter(Sinusoid(k_shot=config.shots, q_queries=config.queries, meta_batch=config.meta_batch, seed=seed))

    return DataSpec(
        train=episodes(config.seed), make_train_dataset=None, make_eval=lambda split, seed: episodes(seed),
        task="regression", example_shape=(1,), out_features=1, loss_fn=F.mse_loss,
    )


def _classification(config: TrainConfig, dataset: Callable[[str], Any]) -> DataSpec:
    """N-way K-shot episodes over the train / val / test class splits of ``dataset``."""
    from pymeta.data import TaskSampler

    splits = {"train": dataset("train")}

    def episodes(split: str, seed: int) -> Iterator[Episode]:
        if split not in splits:
            splits[split] = dataset(split)
        return iter(TaskSampler(splits[split], config.ways, config.shots, config.queries, config.meta_batch, seed))

    example_shape = tuple(splits["train"][0][0].shape)
    return DataSpec(
        train=episodes("train", config.seed), make_train_dataset=lambda: splits["train"],
        make_eval=episodes, task="classification",
        example_shape=example_shape, out_features=config.ways, loss_fn=F.cross_entropy,
    )


def _glyphs(config: TrainConfig) -> DataSpec:
    from pymeta.data import Glyphs

    return _classification(config, lambda split: Glyphs(split, seed=config.seed))


def _folder(config: TrainConfig) -> DataSpec:
    from pymeta.data import ImageFolderClasses

    root = config.data.split(":", 1)[1]
    if not root:
        raise ValueError("data folder:PATH needs a path, e.g. --data folder:/data/omniglot")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"data folder not found: {root_path}")

    def split_of(split: str) -> Any:
        # Omniglot ships no validation split: validate on the test classes then.
        try:
            return ImageFolderClasses(root_path, split=split)
        except FileNotFoundError:
            if split != "val":
                raise
            return ImageFolderClasses(root_path, split="test")

    return _classification(config, split_of)


def _maml(config: TrainConfig, spec: DataSpec) -> nn.Module:
    from pymeta.algorithms import MAML

    return MAML(
        backbone(config, spec), lr=config.inner_lr, first_order=config.first_order,
        steps=config.inner_steps, loss_fn=spec.loss_fn, strategy=config.strategy,
    )


def _fomaml(config: TrainConfig, spec: DataSpec) -> nn.Module:
    return _maml(TrainConfig(**{**config.to_dict(), "first_order": True}), spec)


def _metasgd(config: TrainConfig, spec: DataSpec) -> nn.Module:
    from pymeta.algorithms import MetaSGD

    return MetaSGD(
        backbone(config, spec), lr=config.inner_lr, first_order=config.first_order,
        steps=config.inner_steps, loss_fn=spec.loss_fn, strategy=config.strategy,
    )


def _anil(config: TrainConfig, spec: DataSpec) -> nn.Module:
    from pymeta.algorithms import ANIL

    network = backbone(config, spec)
    features, head = network[:-1], network[-1]
    return ANIL(features, head, config.inner_lr, config.inner_steps, config.first_order,
                loss_fn=spec.loss_fn, strategy=config.strategy)


def _reptile(config: TrainConfig, spec: DataSpec) -> nn.Module:
    from pymeta.algorithms import Reptile

    return Reptile(backbone(config, spec), config.inner_lr, config.inner_steps,
                   loss_fn=spec.loss_fn, strategy=config.strategy)


def _reptile_step(learner: nn.Module, episode: Episode, spec: DataSpec) -> None:
    """Reptile trains on all of each task's examples and has no query loss to log."""
    learner.outer_grad(torch.cat([episode.support_x, episode.query_x], 1),
                       torch.cat([episode.support_y, episode.query_y], 1))


def _protonet(config: TrainConfig, spec: DataSpec) -> nn.Module:
    from pymeta.algorithms import ProtoNet

    return ProtoNet(backbone(config, spec, n_out=None))


def _finetune(config: TrainConfig, spec: DataSpec) -> nn.Module:
    from pymeta.algorithms import FineTune

    base = spec.make_train_dataset()
    return FineTune(backbone(config, spec, n_out=None), config.ways, config.inner_lr, config.inner_steps,
                    base_classes=base.num_classes, strategy=config.strategy)


def _base_class_batches(config: TrainConfig, spec: DataSpec) -> Iterator[Any]:
    """Endless shuffled mini-batches ``(x [B, ...], y [B])`` of the base classes."""
    base = spec.make_train_dataset()
    batch = config.meta_batch * config.ways * (config.shots + config.queries)  # same images per step
    generator = torch.Generator().manual_seed(config.seed)
    while True:
        for index in torch.randperm(len(base), generator=generator).split(batch):
            if len(index) == batch:
                xs, ys = zip(*(base[int(i)] for i in index), strict=True)
                yield _Batch((torch.stack(xs), torch.as_tensor(ys)))


class _Batch(tuple):
    """``(x, y)`` with ``.to(device)``, like :class:`Episode`."""

    def to(self, device: str) -> _Batch:
        return _Batch(t.to(device) for t in self)


def _pretrain_step(learner: nn.Module, batch: _Batch, spec: DataSpec) -> float:
    x, y = batch
    loss = F.cross_entropy(learner(x), y)
    loss.backward()
    return loss.item()


def backbone(config: TrainConfig, spec: DataSpec, n_out: int | str | None = "head") -> nn.Module:
    """The standard network for the data: MLP 1-40-40-1 for sinusoid, conv4 for images.

    ``n_out="head"``: a classifier with one output per way; ``None``: the encoder only.
    """
    from pymeta import models

    if spec.task == "regression":
        return models.mlp(spec.example_shape[0], (40, 40), spec.out_features)
    n_out = spec.out_features if n_out == "head" else n_out
    return models.conv4(in_channels=spec.example_shape[0], n_way=n_out, image_size=spec.example_shape[-1])


DATASETS["sinusoid"] = _sinusoid
DATASETS["glyphs"] = _glyphs
DATASETS["folder"] = _folder
ALGORITHMS.update(
    maml=Algorithm(_maml),
    fomaml=Algorithm(_fomaml),
    metasgd=Algorithm(_metasgd),
    anil=Algorithm(_anil),
    reptile=Algorithm(_reptile, train_step=_reptile_step),
    protonet=Algorithm(_protonet),
    finetune=Algorithm(_finetune, train_step=_pretrain_step, batches=_base_class_batches),
)


def plot_history(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Write a PNG of the learning curves: running meta-loss and validation metric per step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(steps, [h["meta_loss"] for h in history], marker="o")
    loss_ax.set(xlabel="meta-step", ylabel="meta-loss (running mean)", title="training")
    val = [h["val"] for h in history]
    ci = [h["val_ci95"] for h in history]
    val_ax.errorbar(steps, val, yerr=ci, marker="o", capsize=3)
    val_ax.set(xlabel="meta-step", ylabel="validation metric (95% CI)", title="validation")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
