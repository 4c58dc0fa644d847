"""The transfer baseline of Chen et al. 2019 ("A Closer Look at Few-shot Classification")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _validate, _value_checks
from pymeta.algorithms._embed import embed_episode, embedding_picker
from pymeta.algorithms.base import Learner
from pymeta.algorithms.maml import check_lr
from pymeta.core.batched import FastWeights, LossFn, TaskBatched
from pymeta.core.inner_loop import inner_loop, trainable

if TYPE_CHECKING:
    from pymeta.training import DataSpec, ShuffledBatches, TrainConfig


class FineTune(Learner, cli=("finetune",)):
    """Pre-train on the base classes, then fit a fresh linear head per task ("Baseline").

    Pre-training is ordinary supervised learning: ``forward(x)`` returns logits over the
    ``base_classes`` classes of the training split (``classifier(encoder(x))``), so a
    standard loop trains the encoder and ``classifier``::

        encoder = conv4(3, n_way=None, image_size=84)   # pymeta.models: 1600 features
        ft = pymeta.FineTune(encoder, n_way=5, lr=0.1, steps=100, base_classes=64)
        opt = torch.optim.Adam(ft.parameters())
        for x, y in base_loader:                     # x [B, ...], y [B] in 0..base_classes-1
            opt.zero_grad(); F.cross_entropy(ft(x), y).backward(); opt.step()

    ``episode`` then solves every task of a batch at once: a new ``n_way``-way linear
    head (``feature_dim -> n_way``), **zero-initialised** (the softmax loss of a linear
    head is convex, so the start only has to be deterministic and task-independent),
    takes ``steps`` full-batch SGD steps at ``lr`` on the task's support set (the
    batched engine, first order) and predicts the queries. With
    ``finetune_encoder=True`` every task also adapts its own copy of the encoder's
    weights (starting from the pre-trained ones) in the same steps.

    Args:
        encoder: feature network ``[B, ...] -> [B, ...]``, flattened to ``[B, feature_dim]``.
        n_way: classes per task N (>= 2); support labels are ``0..N-1``.
        lr: fine-tuning learning rate.
        steps: fine-tuning SGD steps per task.
        finetune_encoder: adapt the encoder per task too (default: only the head).
        base_classes: number of pre-training classes (outputs of ``classifier``).
        feature_dim: size of the flattened encoder output; default
            ``encoder.out_features`` (set by the backbones of :mod:`pymeta.models`).
        strategy: execution strategy (see :class:`pymeta.MAML`) of the fine-tuning loop
            and, when the frozen encoder has BatchNorm, of its embedding (``"auto"``
            picks for each separately).
        check_finite: raise on a NaN/inf fine-tuning loss or gradient (see :class:`pymeta.MAML`).

    BatchNorm in ``encoder`` (inside ``episode`` only) follows its mode: running
    statistics in eval mode; in train mode per-task batch statistics, running
    statistics untouched; the frozen encoder normalises support and query of a task
    together (:func:`pymeta.algorithms._embed.embed_episode`), an adapted one follows
    MAML's policy (support and query batches separately).

    ``pymeta train --algo finetune`` pre-trains on the base classes
    (:meth:`training_batches`, :meth:`train_step`) and evaluates with ``episode``.
    """

    # pre-training batches of meta_batch * ways * (shots + queries) images, then 100
    # full-batch SGD steps of a zero-initialised head per task.
    cli_defaults: ClassVar[dict[str, dict[str, Any]]] = {"glyphs": dict(inner_steps=100, inner_lr=0.5), "folder": dict(inner_steps=100, inner_lr=0.5)}
    cli_tasks = ("classification",)

    def __init__(
        self,
        encoder: nn.Module,
        n_way: int,
        lr: float,
        steps: int = 100,
        finetune_encoder: bool = False,
        *,
        base_classes: int,
        feature_dim: int | None = None,
        strategy: str = "auto",
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if _validate.non_negative_int("n_way", n_way) < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}")
        self.encoder = encoder
        self.n_way = n_way
        self.lr = check_lr(lr)
        self.steps = _validate.non_negative_int("steps", steps)
        self.finetune_encoder = bool(finetune_encoder)
        self.check_finite = bool(check_finite)
        if feature_dim is None:
            feature_dim = getattr(encoder, "out_features", None)
            if feature_dim is None:
                raise ValueError("feature_dim is required: the encoder has no out_features attribute")
        self.feature_dim = _validate.positive_int("feature_dim", feature_dim)
        self.classifier = nn.Linear(feature_dim, _validate.positive_int("base_classes", base_classes))
        # The per-task head only lends its computation: its weights always come from the
        # episode, so it lives in plain attributes, outside parameters() and state_dict().
        head = nn.Linear(feature_dim, n_way)
        self._head = TaskBatched(head)
        self._network = TaskBatched(nn.Sequential(encoder, nn.Flatten(), head))
        self._picker = (self._network if self.finetune_encoder else self._head).picker(strategy)
        # The frozen encoder's embedding (finetune_encoder=False only): its strategy
        # picker is None without BatchNorm (one flat batch), else checkpointed.
        self._embedder = TaskBatched(encoder)
        self._embed_picker = None if self.finetune_encoder else embedding_picker(self._embedder, strategy)

    def forward(self, x: Tensor) -> Tensor:
        """Pre-training logits over the base classes: ``[B, ...] -> [B, base_classes]``."""
        return self.classifier(self.encoder(x).flatten(1))

    @property
    def inner_steps(self) -> int:
        """``steps``, the fine-tuning SGD steps per task (settable)."""
        return self.steps

    @inner_steps.setter
    def inner_steps(self, value: int) -> None:
        self.steps = _validate.non_negative_int("inner_steps", value)

    @property
    def strategy(self) -> str | None:
        """The fine-tuning loop's strategy (None while ``"auto"`` is still measuring)."""
        return self._picker.chosen

    def train_step(self, batch: tuple[Tensor, Tensor], loss_fn: LossFn) -> Tensor:
        """One pre-training step on a supervised batch ``(x [B, ...], y [B])`` of base classes."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        loss.backward()
        return loss.detach()

    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> FineTune:
        base = data.make_train_dataset()
        return cls(data.backbone(n_out=None), config.ways, config.inner_lr, config.inner_steps,
                   base_classes=base.num_classes, strategy=config.strategy, check_finite=config.inner_check_finite)

    @classmethod
    def training_batches(cls, config: TrainConfig, data: DataSpec) -> ShuffledBatches:
        """Pre-training: as many base-class images per step as a meta-batch of episodes holds."""
        from pymeta.training import ShuffledBatches

        batch = config.meta_batch * config.ways * (config.shots + config.queries)
        return ShuffledBatches(data.make_train_dataset(), batch, config.seed)

    def _zero_head(self, like: Tensor, num_tasks: int, prefix: str) -> FastWeights:
        """Fresh heads for all tasks: ``weight [T, N, D]`` and ``bias [T, N]`` of zeros."""
        weight = like.new_zeros(num_tasks, self.n_way, self.feature_dim)
        bias = like.new_zeros(num_tasks, self.n_way)
        return trainable({f"{prefix}weight": weight, f"{prefix}bias": bias}, leaf=True)

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Fine-tune a head (and optionally the encoder) per task, predict its queries.

        Args:
            support_x: ``[T, S, ...]`` support inputs.
            support_y: ``[T, S]`` int64 labels in ``0..n_way-1``, every class in every task.
            query_x: ``[T, Q, ...]`` query inputs.

        Returns:
            ``[T, Q, n_way]`` logits of the fine-tuned classifiers.
        """
        num_tasks = _validate.episode(support_x, support_y, query_x, classification=True, model=self.encoder)
        _value_checks.class_counts(support_y, self.n_way, "support_y")
        if self.finetune_encoder:
            batched, x, qx = self._network, support_x, query_x
            # Every trainable encoder weight starts from the pre-trained one ("0." is the
            # encoder in the template network, "2." the head).
            weights = {**batched.expand(batched.meta_parameters(), num_tasks), **self._zero_head(x, num_tasks, "2.")}
        else:
            # The encoder is fixed: embed once, then only the head runs in the loop.
            support, query = embed_episode(self._embedder, self._embed_picker, support_x, query_x)
            batched, x, qx = self._head, support.flatten(2), query.flatten(2)  # [T, S, D], [T, Q, D]
            weights = self._zero_head(x, num_tasks, "")
        with self._picker.timed() as strategy:
            weights = inner_loop(
                batched, weights, x, support_y, F.cross_entropy, self.lr, self.steps, True, strategy, self.check_finite
            )
            return batched.forward(weights, qx, strategy)
