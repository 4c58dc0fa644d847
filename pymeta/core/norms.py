"""Episode normalisation policy for BatchNorm: PyTorch's train/eval meaning, per task.

A BatchNorm layer inside ``episode`` does what it does in PyTorch, with tasks kept apart:

* **eval mode** (``layer.eval()``, running statistics tracked): it normalises with its
  running statistics, exactly as ``layer(x)`` does; each example is then independent of
  the others and of the task. This is what a pretrained encoder expects and what
  learn2learn's ``clone()`` / ``adapt()`` do, so ``episode`` agrees with them.
* **train mode**, or a layer built with ``track_running_stats=False``: it normalises with
  the statistics of the batch it sees, **per task** (transductive, as in the MAML
  reference code: the support batch in the inner loop, the query batch for the
  prediction). Running statistics are never updated inside an episode: one update
  would mix the per-task fast weights of all tasks (and an in-place update of an
  unbatched buffer is an error under ``vmap`` anyway), so ``episode`` never corrupts
  the statistics a user saved.

Per-step statistics (MAML++): a caller may pass a BatchNorm layer's ``running_mean`` and
``running_var`` with the fast weights (:meth:`pymeta.core.batched.TaskBatched.forward`),
which then replace the layer's own in eval mode, and ask for the batch statistics each
such layer normalised with in train mode (``record``): ``{layer name: (mean, var)}``,
each ``[T, C]``, per task, unbiased variance as ``F.batch_norm`` uses for its running
update, computed without a graph. The episode itself still writes no statistics; the
caller decides what to do with them.

On exactness: ``vmap`` over ``torch.func.grad`` gives wrong second-order gradients
through ``batch_norm`` in training mode and affine ``layer_norm`` (pytorch/functorch
issue 534, open since 2022; measured here in float64 on a conv net with BatchNorm: the
meta-gradient of the layers before the norm is off by ~4e-2 relative at 1 inner step
and ~2e-1 at 3). pymeta never nests ``grad`` inside ``vmap``: it vmaps only the forward
and differentiates the summed task losses outside it. In that formulation the native
kernels are exact (float64 relative error ~1e-15 at 1 and 3 inner steps against a
per-task reference, checked by tests/test_maml.py), so the fused native kernels stay in
use. In float32, vmap's batched BatchNorm backward rounds worse than a per-task loop
(conv4, second order: ~2e-4 to 2e-3 relative vs ~1e-5 for the loop, measured by
benchmarks/bench_meta.py's gradient check); use ``strategy="loop"`` or ``"lowered"``
where float32 meta-gradients through BatchNorm must be tight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from pymeta.ops.adaptive_max_pool2d import adaptive_max_pool2d
from pymeta.ops.max_pool2d import max_pool2d


def has_batch_norm(module: nn.Module) -> bool:
    """True when ``module`` contains a BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def uses_batch_statistics(module: nn.Module) -> bool:
    """True when a BatchNorm layer of ``module`` normalises with batch statistics now:
    in train mode, or built with ``track_running_stats=False`` (PyTorch's rule)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in module.modules()
    )


def has_max_pool2d(module: nn.Module) -> bool:
    """True when ``module`` contains an ``nn.MaxPool2d`` or ``nn.AdaptiveMaxPool2d`` layer."""
    return any(isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) for m in module.modules())


Stats = dict[str, tuple[Tensor, Tensor]]  # {BatchNorm layer name: (mean, var)}


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, unbiased var)`` of ``x: [B, C, ...]`` as ``[C]`` each, no graph."""
    with torch.no_grad():
        var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=1)
    return mean, var


class EpisodeFunctions(TorchFunctionMode):
    """Function overrides active while a model runs inside an episode.

    Args:
        batch_norm: ``F.batch_norm`` in training mode uses batch statistics and leaves
            running statistics alone (the episode policy above); in eval mode
            (``training=False``: the layer uses its running statistics) it runs unchanged.
        max_pool: ``F.max_pool2d`` and ``F.adaptive_max_pool2d`` take
            :func:`pymeta.ops.max_pool2d`'s and :func:`pymeta.ops.adaptive_max_pool2d`'s
            fast CPU paths (same results, faster forward kernels). Not under ``vmap``, which would need
            a batching rule for it.
        record: where a batch-statistics ``F.batch_norm`` call of a layer in ``marks``
            puts ``record[name] = (mean, var)`` of its input (:func:`batch_statistics`).
        marks: ``(name, tensor)`` pairs: the layer whose ``running_mean`` *is* ``tensor``
            (the one passed to ``functional_call``, which the layer hands to
            ``F.batch_norm``) is ``name``. Created per call, inside any ``vmap``, so the
            tensors are the ones the layers see.
    """

    def __init__(
        self,
        batch_norm: bool = True,
        max_pool: bool = False,
        record: Stats | None = None,
        marks: Sequence[tuple[str, Tensor]] = (),
    ) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        self.max_pool = max_pool
        self.record = record
        self.marks = marks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and self.batch_norm:
            return self._batch_norm(*args, **kwargs)
        if func is F.max_pool2d and self.max_pool:
            return max_pool2d(*args, **kwargs)
        if func is F.adaptive_max_pool2d and self.max_pool:
            return adaptive_max_pool2d(*args, **kwargs)
        return func(*args, **kwargs)

    def _batch_norm(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> Tensor:
        if not training:  # eval mode: the running statistics, exactly as PyTorch
            return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
        if self.record is not None:
            for name, mark in self.marks:
                if running_mean is mark:
                    if name in self.record:
                        raise ValueError(f"BatchNorm layer {name!r} runs more than once per forward: its batch "
                                         "statistics per inner step are ambiguous (use one layer per call)")
                    self.record[name] = batch_statistics(input)
        return F.batch_norm(input, None, None, weight, bias, True, momentum, eps)
