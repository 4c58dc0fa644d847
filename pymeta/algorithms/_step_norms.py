"""MAML++'s per-step BatchNorm: per-step weights, biases and running statistics for the
BatchNorm layers of an unchanged model, kept outside it.

Step ``i``'s tensors reach a layer through the fast weights, by the layer's parameter and
buffer names (:meth:`pymeta.core.batched.TaskBatched.forward`), so ``nn.BatchNorm``'s own
forward runs with them under every strategy. Running statistics: see
:meth:`StepNorms.update_running`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pymeta.core.batched import FastWeights
from pymeta.core.norms import Stats

PER_STEP_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BATCH_NORM_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def batch_norm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers, by name; a ValueError for a BatchNorm layer, or any
    layer with running statistics, that cannot be made per step (e.g. a custom norm
    layer, SyncBatchNorm): per-step tensors are passed to ``nn.BatchNorm``'s own forward."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, PER_STEP_NORMS) and type(m).forward is _BATCH_NORM_FORWARD:
            layers[name] = m
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) or "running_mean" in dict(m.named_buffers(recurse=False)):
            raise ValueError(
                f"model: MAMLpp makes BatchNorm layers per step, but {name!r} is a {type(m).__name__}, which it "
                "cannot: only torch.nn.BatchNorm1d/2d/3d (or subclasses keeping their forward) can be; use those, "
                "or pass per_step_bn_stats=False and per_step_bn_weights=False"
            )
    return layers


class StepNorm(nn.Module):
    """One BatchNorm layer's per-step tensors, each row (step) initialised from the layer:
    ``weight`` / ``bias`` ``[steps, C]`` parameters (affine layers, ``weights=True``) and
    ``running_mean`` / ``running_var`` ``[steps, C]``, ``num_batches_tracked [steps]``
    buffers (layers tracking statistics, ``stats=True``)."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, steps: int, stats: bool, weights: bool) -> None:
        super().__init__()
        self.names: list[str] = []  # which of the layer's tensors are per step
        if weights and layer.affine:
            for name in ("weight", "bias"):
                own = getattr(layer, name)
                setattr(self, name, nn.Parameter(own.detach().repeat(steps, 1), requires_grad=own.requires_grad))
                self.names.append(name)
        if stats and layer.track_running_stats:
            for name in ("running_mean", "running_var"):
                self.register_buffer(name, getattr(layer, name).detach().repeat(steps, 1))
            self.register_buffer("num_batches_tracked", torch.zeros(steps, dtype=torch.long))
            self.names += ["running_mean", "running_var"]


class StatsSum:
    """Batch statistics of one outer step, summed over tasks and forwards, per
    ``(BatchNorm index, layer)``: ``[mean sum, var sum, rows]``."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, str], list[Any]] = {}

    def add(self, index: int, stats: Stats) -> None:
        """Add ``{layer: (mean [T, C], var [T, C])}`` recorded at BatchNorm index ``index``."""
        for name, (mean, var) in stats.items():
            total = self.sums.setdefault((index, name), [0.0, 0.0, 0])
            total[0], total[1], total[2] = total[0] + mean.sum(0), total[1] + var.sum(0), total[2] + mean.shape[0]


class StepNorms(nn.ModuleDict):
    """A :class:`StepNorm` per BatchNorm layer of ``model`` with something per step, keyed
    by the layer's name with ``-`` for ``.`` (``"block1-1"``).

    Args:
        model: the model whose layers are made per step (it is not changed).
        steps: the number of per-step rows.
        stats, weights: per-step running statistics / weights and biases.
    """

    def __init__(self, model: nn.Module, steps: int, stats: bool, weights: bool) -> None:
        layers = batch_norm_layers(model) if stats or weights else {}
        per_step = {name: StepNorm(layer, steps, stats, weights) for name, layer in layers.items()}
        super().__init__({name.replace(".", "-"): m for name, m in per_step.items() if m.names})
        # The model's layers (a plain dict: the model registers them already).
        self._layers = {name: layers[name] for name, m in per_step.items() if m.names}

    def _of(self, name: str) -> StepNorm:
        return self[name.replace(".", "-")]

    def replaced(self) -> set[str]:
        """The model's tensors (``"block1.1.weight"``) whose per-step rows replace them."""
        return {f"{name}.{t}" for name in self._layers for t in self._of(name).names}

    def records(self) -> bool:
        """Whether a layer with per-step statistics normalises with batch statistics (train mode)."""
        return any(layer.training and "running_mean" in self._of(n).names for n, layer in self._layers.items())

    def tensors(self, index: int, num_tasks: int, record: bool) -> FastWeights:
        """BatchNorm index ``index``'s tensors as ``[T, C]`` views by the layers' names:
        weights and biases, and running statistics where a layer uses them (eval mode) or
        its batch statistics are recorded (they mark the layer, see
        :class:`pymeta.core.norms.EpisodeFunctions`)."""
        out = {}
        for name, layer in self._layers.items():
            step_norm = self._of(name)
            for t in step_norm.names:
                if not (t.startswith("running_") and layer.training and not record):
                    out[f"{name}.{t}"] = getattr(step_norm, t)[index].expand(num_tasks, -1)
        return out

    def update_running(self, stats: StatsSum) -> None:
        """One momentum update of each per-step running statistic from an outer step's
        batch statistics at that index, averaged over its tasks and forwards; the layer's
        ``momentum`` (None: a cumulative average, as ``nn.BatchNorm``). No graph."""
        with torch.no_grad():
            for (index, name), (mean, var, rows) in stats.sums.items():
                step_norm, momentum = self._of(name), self._layers[name].momentum
                step_norm.num_batches_tracked[index] += 1
                count = step_norm.num_batches_tracked[index].to(mean.dtype)
                factor = 1.0 / count if momentum is None else momentum
                step_norm.running_mean[index].lerp_(mean / rows, factor)
                step_norm.running_var[index].lerp_(var / rows, factor)

    def statistics(self) -> list[Tensor]:
        """Every per-step running statistic (what :meth:`update_running` writes)."""
        return [getattr(m, t) for m in self.values() for t in m.names if t.startswith("running_")]
