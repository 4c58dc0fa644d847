"""Matching Networks (Vinyals et al. 2016), all tasks of an episode at once.

Each query attends over its task's support embeddings by cosine similarity and takes the
attention-weighted one-hot labels as class probabilities. Full context embeddings (FCE)
first put every embedding in the context of its task's support set, as easyfsl's
``MatchingNetworks`` does: a bidirectional LSTM over the support set, and an LSTM cell
attending over the support set, run once per support example, for the queries. Both
LSTMs are batched over tasks: the tasks are the LSTM's batch (the cell's batch is every
task's queries), so an episode runs one LSTM and ``S`` cell steps, not ``T`` of each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _validate
from pymeta.algorithms._metric import MetricLearner
from pymeta.core.batched import LossFn

if TYPE_CHECKING:
    from pymeta.training import DataSpec, TrainConfig

# Added to the attention-weighted probabilities before the log, as easyfsl.
LOG_EPS = 1e-6


class MatchingNet(MetricLearner, cli=("matchingnet",)):
    """Classify each query by attention over its task's labelled support embeddings.

    Args:
        encoder: embedding network ``[B, ...] -> [B, D]`` (flattened), ``D = feature_dim``.
        feature_dim: the embedding size D.
        support_encoder: with ``fce``, an ``nn.LSTM(D, D, batch_first=True,
            bidirectional=True)`` (the default when None): support embeddings become
            ``g = f + h_forward + h_backward``.
        query_encoder: with ``fce``, an ``nn.LSTMCell(2D, D)`` (the default when None):
            starting from ``h = f``, ``S`` times: ``read = softmax(h g^T) g``,
            ``h = cell([f, read], (h, c))[0] + f``.
        fce: full context embeddings as above (easyfsl's ``MatchingNetworks``); False:
            the encoder's embeddings directly, no LSTMs (``support_encoder`` and
            ``query_encoder`` must then be None).
        batch_stats, strategy, n_way, task_chunk: as for :class:`pymeta.ProtoNet`.

    ``episode`` returns ``[T, Q, N]`` log-probabilities
    ``log(softmax(h normalize(g)^T) onehot(support_y) + 1e-6)``: cosine attention with
    the support side normalised and the query side not (as easyfsl and the original
    code, so the query's norm sharpens the attention). Train with the negative
    log-likelihood (:meth:`query_loss`). The LSTM modules are the attributes
    ``support_encoder`` / ``query_encoder``, the same types easyfsl holds as
    ``support_features_encoder`` / ``query_features_encoding_cell``, so trained modules
    move between the two libraries as they are.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        support_encoder: nn.Module | None = None,
        query_encoder: nn.Module | None = None,
        fce: bool = True,
        *,
        batch_stats: str = "joint",
        strategy: str = "auto",
        n_way: int | None = None,
        task_chunk: int | None = None,
    ) -> None:
        super().__init__(encoder, batch_stats=batch_stats, strategy=strategy, n_way=n_way, task_chunk=task_chunk)
        self.feature_dim = D = _validate.positive_int("feature_dim", feature_dim)
        if not isinstance(fce, bool):
            raise TypeError(f"fce must be a bool, got {type(fce).__name__} {fce!r}")
        self.fce = fce
        if not fce:
            if support_encoder is not None or query_encoder is not None:
                raise ValueError("support_encoder and query_encoder are the full context embeddings: pass them "
                                 "with fce=True, or neither with fce=False")
            self.support_encoder = self.query_encoder = None
            return
        self.support_encoder = support_encoder or nn.LSTM(D, D, batch_first=True, bidirectional=True)
        self.query_encoder = query_encoder or nn.LSTMCell(2 * D, D)
        self._check_fce_modules()

    def _check_fce_modules(self) -> None:
        """``support_encoder`` / ``query_encoder`` are the LSTMs FCE needs (checked again
        every episode: the attributes can be reassigned)."""
        D, lstm, cell = self.feature_dim, self.support_encoder, self.query_encoder
        if not (isinstance(lstm, nn.LSTM) and lstm.input_size == D and lstm.hidden_size == D and lstm.bidirectional
                and lstm.batch_first and lstm.proj_size == 0):
            raise ValueError(
                f"support_encoder must be nn.LSTM({D}, {D}, batch_first=True, bidirectional=True) for fce=True "
                f"(it returns [T, S, 2D] = [T, S, {2 * D}] states), got {lstm!r}"
            )
        if not (isinstance(cell, nn.LSTMCell) and cell.input_size == 2 * D and cell.hidden_size == D):
            raise ValueError(f"query_encoder must be nn.LSTMCell({2 * D}, {D}) for fce=True, got {cell!r}")

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Log-probabilities of every query's class, given its task's support set.

        Args:
            support_x: ``[T, S, ...]`` support inputs.
            support_y: ``[T, S]`` int64 labels ``0..N-1``, every class in every task.
            query_x: ``[T, Q, ...]`` query inputs.

        Returns:
            ``[T, Q, N]`` log-probabilities.
        """
        n_way, _, support, query = self._embed(support_x, support_y, query_x)
        support, query = support.flatten(2), query.flatten(2)  # [T, S, D], [T, Q, D]
        if support.shape[2] != self.feature_dim:
            raise ValueError(
                f"encoder ({type(self.encoder).__name__}) returned {support.shape[2]} features per example, but "
                f"feature_dim is {self.feature_dim}: got shape {tuple(support.shape[1:])} (flattened)"
            )
        if self.fce:
            self._check_fce_modules()
            support = self._support_context(support)
            query = self._query_context(query, support)  # attends over the contextual support
        attention = torch.softmax(query @ F.normalize(support, dim=-1).mT, dim=-1)  # [T, Q, S]
        one_hot = (support_y.unsqueeze(-1) == torch.arange(n_way, device=support_y.device)).to(attention.dtype)
        return (attention @ one_hot + LOG_EPS).log()

    def _support_context(self, f: Tensor) -> Tensor:
        """``g = f + h_forward + h_backward`` of the bidirectional LSTM over each task's support set."""
        states, _ = self.support_encoder(f)  # the tasks are the LSTM's batch: [T, S, 2D]
        return f + states[..., : self.feature_dim] + states[..., self.feature_dim :]

    def _query_context(self, f: Tensor, g: Tensor) -> Tensor:
        """``S`` attention steps of the LSTM cell, for every query of every task at once."""
        T, Q, D = f.shape
        h, c = f.reshape(T * Q, D), torch.zeros_like(f).reshape(T * Q, D)
        for _ in range(g.shape[1]):
            attention = torch.softmax(h.view(T, Q, D) @ g.mT, dim=-1)  # [T, Q, S]
            read = attention @ g  # [T, Q, D]
            h, c = self.query_encoder(torch.cat([f, read], dim=-1).reshape(T * Q, 2 * D), (h, c))
            h = h + f.reshape(T * Q, D)
        return h.view(T, Q, D)

    def query_loss(self, support_y: Tensor) -> LossFn:
        """The negative log-likelihood of the log-probabilities."""
        return F.nll_loss

    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> MatchingNet:
        """conv4 embeddings (64 features for 28x28 images) with full context embeddings."""
        if data.task != "classification":
            raise ValueError(f"{config.algo} classifies: --data must be glyphs or folder:PATH, got {config.data!r}")
        encoder = data.backbone(n_out=None)
        return cls(encoder, encoder.feature_size, strategy=config.strategy, n_way=config.ways,
                   task_chunk=config.task_chunk)
