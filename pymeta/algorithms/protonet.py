"""Prototypical Networks (Snell et al. 2017), all tasks of an episode at once."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pymeta import _validate, ops
from pymeta.algorithms._embed import embed
from pymeta.ops.proto_logits import METRICS


class ProtoNet(nn.Module):
    """Classify each query by its distance to the mean support embedding of each class.

    Args:
        encoder: embedding network ``[B, ...] -> [B, ...]`` (flattened to ``[B, D]``).
        metric: ``"sqeuclidean"`` (``-||q - p||^2``, the paper), ``"euclidean"``
            (``-||q - p||``, easyfsl) or ``"cosine"`` (cosine similarity), see
            :func:`pymeta.ops.proto_logits`.

    ``episode`` embeds the support and query examples of all tasks in one call, takes the
    prototypes with :func:`pymeta.ops.prototypes` and the logits with
    :func:`pymeta.ops.proto_logits`; train with cross-entropy of the logits against the
    query labels. BatchNorm in ``encoder`` normalises each task with the statistics of
    its support and query examples together, running statistics untouched
    (:func:`pymeta.algorithms._embed.embed`).

    The number of classes N is inferred per episode as ``support_y.max() + 1``: labels
    are ``0..N-1`` and every class needs a support example in every task (checked; this
    reads the labels, one device sync on GPU).
    """

    def __init__(self, encoder: nn.Module, metric: str = "sqeuclidean") -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder
        self.metric = _validate.choice("metric", metric, METRICS)

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings of one batch: ``[B, ...] -> [B, ...]``."""
        return self.encoder(x)

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits of every query against its task's class prototypes.

        Args:
            support_x: ``[T, S, ...]`` support inputs.
            support_y: ``[T, S]`` int64 labels ``0..N-1``, every class in every task.
            query_x: ``[T, Q, ...]`` query inputs.

        Returns:
            ``[T, Q, N]`` logits (negative distances, or cosine similarities).
        """
        _validate.episode(support_x, support_y, query_x, classification=True, model=self.encoder)
        n_way = int(support_y.max()) + 1
        _validate.class_counts(support_y, n_way, "support_y")
        if n_way < 2:
            raise ValueError(f"support_y must hold at least 2 classes (labels 0..N-1), got only class {n_way - 1}")
        shots = support_x.shape[1]
        emb = embed(self.encoder, torch.cat([support_x, query_x], dim=1)).flatten(2)
        protos = ops.prototypes(emb[:, :shots], support_y, n_way)
        return ops.proto_logits(emb[:, shots:], protos, self.metric)
