"""Relation Networks (Sung et al. 2018), all tasks of an episode at once.

A query is scored against each class by a learned relation module on the class's and
the query's feature maps concatenated on channels. easyfsl and the paper's code build
the ``[Q * N, 2C, H, W]`` pairs per task; here the relation module's first block
(Conv2d, BatchNorm2d, ReLU: the paper's and easyfsl's default) runs through
:func:`pymeta.ops.relation_pairs` instead: the convolution split into N class and Q
query convolutions, then the pairs only at its output width, normalised per task, and
the rest of the module on those for all tasks at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _validate, ops
from pymeta.algorithms._embed import embedding_picker
from pymeta.algorithms._metric import MetricLearner
from pymeta.core.batched import LossFn, StrategyPicker, TaskBatched
from pymeta.core.norms import uses_batch_statistics

if TYPE_CHECKING:
    from pymeta.training import DataSpec, TrainConfig

PROTOTYPES = ("mean", "sum")
LOSSES = ("mse", "cross_entropy")


def default_relation_module(feature_dim: int, hidden: int = 8) -> nn.Sequential:
    """The relation module of Sung et al. as easyfsl builds it (``default_relation_module``).

    ``[P, 2C, H, W] -> [P, 1]`` scores in (0, 1) for ``C = feature_dim``: two blocks of
    conv3x3 -> BatchNorm (momentum 1, as the paper's code) -> ReLU -> adaptive max-pool
    (to 5x5, then 1x1), then Linear(C, hidden) -> ReLU -> Linear(hidden, 1) -> sigmoid.
    Same layers and parameter names as easyfsl's, so state dicts move between the two.
    """
    _validate.positive_int("feature_dim", feature_dim)
    _validate.positive_int("hidden", hidden)
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(2 * feature_dim, feature_dim, kernel_size=3, padding=1),
            nn.BatchNorm2d(feature_dim, momentum=1, affine=True),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d((5, 5)),
        ),
        nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim, kernel_size=3, padding=0),
            nn.BatchNorm2d(feature_dim, momentum=1, affine=True),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d((1, 1)),
        ),
        nn.Flatten(),
        nn.Linear(feature_dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
        nn.Sigmoid(),
    )


def relation_mse_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """The paper's loss: mean squared error of the scores ``[..., N]`` against one-hot labels ``[...]``."""
    return F.mse_loss(scores, F.one_hot(labels, scores.shape[-1]).to(scores.dtype))


def _layers(module: nn.Module) -> list[nn.Module]:
    """``module`` as its sequence of layers: nested ``nn.Sequential`` containers flattened."""
    if type(module).forward is nn.Sequential.forward:
        return [layer for child in module for layer in _layers(child)]
    return [module]


def _fusable_block(layers: list[nn.Module]) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    """The leading Conv2d + BatchNorm2d + ReLU that :func:`pymeta.ops.relation_pairs` can
    run (one group, zero padding, BatchNorm over the conv's channels), else None."""
    if len(layers) < 3:
        return None
    conv, norm, relu = layers[:3]
    if not (isinstance(conv, nn.Conv2d) and type(norm) is nn.BatchNorm2d and isinstance(relu, nn.ReLU)):
        return None
    if conv.groups != 1 or conv.padding_mode != "zeros" or norm.num_features != conv.out_channels:
        return None
    return conv, norm


class RelationNet(MetricLearner, cli=("relationnet", "relationnet-ce")):
    """Score each query against each class with a learned relation module.

    Args:
        encoder: ``[B, ...] -> [B, C, H, W]`` feature maps (no flatten), ``C = feature_dim``.
        feature_dim: the channels C of the encoder's maps.
        relation_module: ``[P, 2C, H, W] -> [P]`` or ``[P, 1]``, one score per pair, the
            class's maps first then the query's (easyfsl's order); None:
            :func:`default_relation_module`. Modules whose first layers are Conv2d (one
            group, zero padding), BatchNorm2d and ReLU, within any nesting of
            ``nn.Sequential``, run that block through :func:`pymeta.ops.relation_pairs`
            (nothing of size ``Q * N * 2C * H * W``); others get the pairs materialised.
        prototype: a class's feature maps: the ``"mean"`` of its support maps (easyfsl)
            or their ``"sum"`` (the paper).
        loss: the training loss (:meth:`query_loss`): ``"mse"`` against one-hot labels
            (the paper) or ``"cross_entropy"`` of the scores.
        batch_stats, strategy, n_way, task_chunk: as for :class:`pymeta.ProtoNet`;
            ``strategy`` also picks how the relation module's BatchNorm layers see each
            task's pairs.

    ``episode`` returns ``[T, Q, N]`` relation scores. BatchNorm follows the module's
    mode (:mod:`pymeta.core.norms`): in train mode the relation module's BatchNorm
    normalises with the statistics of one task's ``Q * N`` pairs (as easyfsl's per-task
    loop), in eval mode with its running statistics; running statistics are never
    updated inside an episode (easyfsl's train-mode forward overwrites them: momentum 1).
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        relation_module: nn.Module | None = None,
        prototype: str = "mean",
        *,
        loss: str = "mse",
        batch_stats: str = "joint",
        strategy: str = "auto",
        n_way: int | None = None,
        task_chunk: int | None = None,
    ) -> None:
        super().__init__(encoder, batch_stats=batch_stats, strategy=strategy, n_way=n_way, task_chunk=task_chunk)
        self.feature_dim = _validate.positive_int("feature_dim", feature_dim)
        if relation_module is None:
            relation_module = default_relation_module(feature_dim)
        if not isinstance(relation_module, nn.Module):
            raise TypeError(f"relation_module must be a torch.nn.Module, got {type(relation_module).__name__}")
        self.relation_module = relation_module
        self.prototype = _validate.choice("prototype", prototype, PROTOTYPES)
        self.loss = _validate.choice("loss", loss, LOSSES)
        layers = _layers(relation_module)
        if layers and isinstance(layers[0], nn.Conv2d) and layers[0].in_channels != 2 * feature_dim:
            raise ValueError(
                f"relation_module's first layer {layers[0]} must take the 2 * feature_dim = {2 * feature_dim} "
                f"channels of a (class, query) pair, got in_channels={layers[0].in_channels}"
            )
        self._block = _fusable_block(layers)
        # After the fused block: the rest of the module's layers (the same module objects,
        # not registered again); else the whole module on the materialised pairs.
        head = nn.Sequential(*layers[3:]) if self._block is not None else relation_module
        self._head = TaskBatched(head)
        self._head_picker: StrategyPicker | None = embedding_picker(self._head, strategy)

    @property
    def fused(self) -> bool:
        """Whether the relation module's first block runs through :func:`pymeta.ops.relation_pairs`."""
        return self._block is not None

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Relation scores of every query against every class of its task.

        Args:
            support_x: ``[T, S, ...]`` support inputs.
            support_y: ``[T, S]`` int64 labels ``0..N-1``, every class in every task.
            query_x: ``[T, Q, ...]`` query inputs.

        Returns:
            ``[T, Q, N]`` scores (the relation module's outputs; in (0, 1) for the default).
        """
        n_way, counts, support, query = self._embed(support_x, support_y, query_x)
        self._check_maps(support)
        T, Q = query.shape[:2]
        maps = support.shape[2:]
        classes = ops.prototypes(support.flatten(2), support_y, n_way).unflatten(2, maps)  # [T, N, C, H, W]
        if self.prototype == "sum":
            classes = classes * counts.to(classes.dtype)[:, :, None, None, None]
        pairs = self._fused_pairs(classes, query) if self._block is not None else self._pairs(classes, query)
        scores = self._run_head(pairs)  # [T, Q * N, ...]
        if scores.shape[2:].numel() != 1:
            raise ValueError(
                f"relation_module ({type(self.relation_module).__name__}) must return one score per pair, [P] or "
                f"[P, 1] for P = Q * N = {Q} * {n_way} pairs, got shape {tuple(scores.shape[1:])}"
            )
        return scores.reshape(T, Q, n_way)

    def _check_maps(self, support: Tensor) -> None:
        """The encoder must return ``[B, feature_dim, H, W]`` maps (``support``: ``[T, S, ...]``)."""
        shape = tuple(support.shape[1:])
        name = type(self.encoder).__name__
        if support.dim() != 5:
            raise ValueError(
                f"RelationNet compares feature maps: encoder ({name}) must return [B, C, H, W] (no flatten), "
                f"got shape {shape}"
            )
        if support.shape[2] != self.feature_dim:
            raise ValueError(
                f"encoder ({name}) returned maps of {support.shape[2]} channels, but feature_dim is "
                f"{self.feature_dim}: got shape {shape}"
            )

    @staticmethod
    def _pairs(classes: Tensor, query: Tensor) -> Tensor:
        """The ``[T, Q * N, 2C, H, W]`` pairs, class maps first (the general path)."""
        T, N = classes.shape[:2]
        Q = query.shape[1]
        shape = (T, Q, N, *classes.shape[2:])
        pairs = torch.cat([classes.unsqueeze(1).expand(shape), query.unsqueeze(2).expand(shape)], dim=3)
        return pairs.flatten(1, 2)

    def _fused_pairs(self, classes: Tensor, query: Tensor) -> Tensor:
        """The first block's output ``[T, Q * N, C', H', W']`` by :func:`pymeta.ops.relation_pairs`:
        ``conv(W, [p; q]) + b = conv(W[:, :C], p) + b + conv(W[:, C:], q)``."""
        conv, norm = self._block
        c = classes.shape[2]

        def convolve(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            y = F.conv2d(x.flatten(0, 1), weight, bias, conv.stride, conv.padding, conv.dilation)
            return y.unflatten(0, x.shape[:2])

        sides = convolve(classes, conv.weight[:, :c], conv.bias), convolve(query, conv.weight[:, c:], None)
        eval_stats = not uses_batch_statistics(norm)
        pairs = ops.relation_pairs(*sides, norm.weight, norm.bias, norm.running_mean if eval_stats else None,
                                   norm.running_var if eval_stats else None, norm.eps)
        return pairs.flatten(1, 2)

    def _run_head(self, pairs: Tensor) -> Tensor:
        """The relation module (or its rest after the fused block) on ``[T, P, ...]`` pairs,
        BatchNorm seeing one task's pairs at a time."""
        if self._head_picker is None or not uses_batch_statistics(self._head.module):
            return self._head.flat(pairs)  # tasks independent: one batch
        with self._head_picker.timed() as strategy:
            return self._head.forward({}, pairs, strategy)

    def query_loss(self, support_y: Tensor) -> LossFn:
        """``loss``: :func:`relation_mse_loss` (``"mse"``) or ``F.cross_entropy``."""
        return relation_mse_loss if self.loss == "mse" else F.cross_entropy

    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> RelationNet:
        """conv4 with pooling in its first two blocks only (the paper's encoder layout:
        64 x 7 x 7 maps for 28x28 images), the default relation module; ``relationnet``
        trains with MSE, ``relationnet-ce`` with cross-entropy."""
        if data.task != "classification":
            raise ValueError(f"{config.algo} classifies: --data must be glyphs or folder:PATH, got {config.data!r}")
        net = data.backbone(n_out=None)  # conv4: block1..block4 = conv, BatchNorm, ReLU, max-pool; flatten
        encoder = nn.Sequential(net.block1, net.block2, net.block3[:-1], net.block4[:-1])
        return cls(encoder, net.block4[0].out_channels, loss="cross_entropy" if config.algo == "relationnet-ce" else "mse",
                   strategy=config.strategy, n_way=config.ways, task_chunk=config.task_chunk)
