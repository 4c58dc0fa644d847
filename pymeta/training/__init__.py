"""Meta-training and evaluation loops behind the ``pymeta`` command.

Everything here is ordinary PyTorch: a learner (an ``nn.Module`` with ``episode``), a
``torch.optim`` optimizer, and an iterable of :class:`pymeta.data.Episode`. The command
line is a thin layer over :func:`train` and :func:`evaluate`.

Checkpoints (written atomically, by rank 0 only): at every validation ``train`` writes
``<out stem>-last<suffix>`` (e.g. ``runs/pymeta-last.pt``), and ``out`` itself whenever
the validation metric improves (the best model). Both hold everything a resumed run
needs: model, optimizer (and its learning-rate schedule), the training batches' stream
state, the torch / numpy / python RNG states, the execution strategies the learner
chose, step, history and config. ``train(config, resume=path)`` (``pymeta train ... --resume path``) continues
from either and reproduces the uninterrupted run exactly (same losses, same
parameters), provided the execution strategy is fixed or was already chosen when the
checkpoint was written: ``strategy="auto"`` picks by timing, so two separate runs may
pick differently and differ by rounding.

Inside a ``torch.distributed`` process group (``pymeta train --nproc N``, or torchrun),
:func:`train` and :func:`evaluate` shard every batch's tasks across the ranks (see
:mod:`pymeta.distributed`): same loop, same results up to rounding.

The modules, one concern each: :mod:`~pymeta.training.config` (:class:`TrainConfig`, the
per-data defaults), :mod:`~pymeta.training.data` (:class:`DataSpec` per ``--data``,
:func:`build`), :mod:`~pymeta.training.steps` (one training step),
:mod:`~pymeta.training.evaluation` (:func:`evaluate`, confidence intervals, the report),
:mod:`~pymeta.training.state` (checkpoints and RNG states), :mod:`~pymeta.training.loop`
(:func:`train`) and :mod:`~pymeta.training.plots`. The algorithms plug in through the
learner contract (:mod:`pymeta.algorithms.base`), not here.
"""

from pymeta.training.config import (
    DATA_DEFAULTS,
    RUN_FIELDS,
    TrainConfig,
    algos_with,
    trains_on_episodes,
)
from pymeta.training.data import Batch, DataSpec, ShuffledBatches, build
from pymeta.training.evaluation import Stats, confidence, evaluate, evaluate_test, report_line
from pymeta.training.loop import Interrupted, Result, train
from pymeta.training.plots import plot_history
from pymeta.training.state import check_out, last_checkpoint_path, load_learner, resume_state
from pymeta.training.steps import learner_step

__all__ = [
    "DATA_DEFAULTS", "RUN_FIELDS", "Batch", "DataSpec", "Interrupted", "Result", "ShuffledBatches", "Stats",
    "TrainConfig", "algos_with", "build", "check_out", "confidence", "evaluate", "evaluate_test",
    "last_checkpoint_path", "learner_step", "load_learner", "plot_history", "report_line", "resume_state", "train",
    "trains_on_episodes",
]
