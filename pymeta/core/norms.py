"""Episode normalisation policy for BatchNorm.

Inside ``episode`` every BatchNorm layer normalises with the statistics of the batch it
sees, per task (transductive, as in the MAML reference code), and running statistics
are never updated: they would mix the per-task fast weights of all tasks, and an
in-place update of an unbatched buffer is an error under ``vmap`` anyway.

On exactness: ``vmap`` over ``torch.func.grad`` gives wrong second-order gradients
through ``batch_norm`` and affine ``layer_norm`` (pytorch/functorch#534; see
DESIGN.md, "Known traps"). pymeta never nests ``grad`` inside ``vmap``: it vmaps only
the forward and takes one ``torch.autograd.grad`` of the summed task losses outside
it. In that formulation the native kernels are exact (float64 relative error ~1e-15
at 1 and 3 inner steps against a per-task reference, checked by tests/test_maml.py),
so the fused native kernels stay in use. In float32, vmap's batched BatchNorm backward
rounds worse than a per-task loop (conv4, second order: ~2e-4 to 2e-3 relative vs
~1e-5 for the loop, measured by benchmarks/bench_meta.py's gradient check); use
``strategy="loop"`` where float32 meta-gradients through BatchNorm must be tight.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from pymeta.ops.max_pool2d import max_pool2d


def has_batch_norm(module: nn.Module) -> bool:
    """True when ``module`` contains a BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def has_max_pool2d(module: nn.Module) -> bool:
    """True when ``module`` contains an ``nn.MaxPool2d`` layer."""
    return any(isinstance(m, nn.MaxPool2d) for m in module.modules())


class EpisodeFunctions(TorchFunctionMode):
    """Function overrides active while a model runs inside an episode.

    Args:
        batch_norm: ``F.batch_norm`` uses batch statistics and leaves running
            statistics alone (the episode policy above).
        max_pool: ``F.max_pool2d`` takes :func:`pymeta.ops.max_pool2d`'s fast CPU path
            (same results, a faster forward kernel). Not under ``vmap``, which would need
            a batching rule for it.
    """

    def __init__(self, batch_norm: bool = True, max_pool: bool = False) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        self.max_pool = max_pool

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and self.batch_norm:
            return self._batch_norm(*args, **kwargs)
        if func is F.max_pool2d and self.max_pool:
            return max_pool2d(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _batch_norm(
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> Tensor:
        return F.batch_norm(input, None, None, weight, bias, True, momentum, eps)
