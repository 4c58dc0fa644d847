"""Meta-SGD (Li et al. 2017): MAML with a learnable inner learning rate per weight element."""

from __future__ import annotations

import torch
from torch import nn

from pymeta.algorithms.maml import MAML
from pymeta.core.batched import LossFn


class MetaSGD(MAML, cli=("metasgd",)):
    """MAML whose inner step is ``w - lr_w * g`` with a learned ``lr_w`` shaped like ``w``.

    ``lrs`` is an ``nn.ParameterList`` holding one tensor per parameter of ``model``
    (in ``model.parameters()`` order, shape of that parameter), initialised to ``lr``;
    the optimizer meta-learns them with the model, as in learn2learn (``lrs.0``,
    ``lrs.1``, ... in the state dict). With ``first_order=True`` the inner gradients
    are constants but the learning rates still get meta-gradients (the update is
    linear in them), again as in learn2learn.

    Same two APIs as :class:`MAML`: learn2learn's ``clone()`` / ``adapt(loss)`` (a
    clone shares ``lrs`` with this module, so their meta-gradients land here), and the
    batched ``episode``, where the same ``lrs`` serve every task (broadcast over the
    task dim by :func:`pymeta.ops.inner_sgd`).

    Args:
        model: the network to meta-learn; its forward takes one batch ``[B, ...]``.
        lr: initial value of every learning rate (learn2learn's default, 1.0).
        first_order, allow_unused, allow_nograd, steps, loss_fn, strategy,
            check_finite, checkpoint_steps, task_chunk: as in :class:`MAML`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        *,
        steps: int = 1,
        loss_fn: LossFn | None = None,
        strategy: str = "auto",
        check_finite: bool = False,
        checkpoint_steps: bool = False,
        task_chunk: int | None = None,
    ) -> None:
        super().__init__(
            model, lr, first_order, allow_unused, allow_nograd,
            steps=steps, loss_fn=loss_fn, strategy=strategy, check_finite=check_finite,
            checkpoint_steps=checkpoint_steps, task_chunk=task_chunk,
        )
        params = dict(model.named_parameters())
        self.lrs = nn.ParameterList(nn.Parameter(torch.full_like(p, self.lr)) for p in params.values())
        # Adapted weights are addressed by name (a clone's fast weights have no index).
        self._lr_index = {name: i for i, name in enumerate(params)}

    def _inner_lr(self, names: list[str]) -> list[torch.Tensor]:
        """The per-element learning rates of the weights ``names``, each shaped like its weight."""
        return [self.lrs[self._lr_index[n]] for n in names]
