"""The benchmark workloads, each defined once: data, model, hyperparameters, group.

A :class:`Workload` makes a :class:`Problem` (the algorithm, the model, a meta-batch of
episodes, the inner-loop hyperparameters) and hands it to a library's implementation in
``peers/`` (:func:`peers.build`), which returns the :class:`peers.MetaStep` that the
driver (``bench_meta.py``) times. Data come from fixed-seed generators and models from a
fixed seed, generated on the CPU and then moved to ``device``: every library, on every
device, starts from the same numbers.

Groups (``--workloads a b c d e f m``):

* (a) ``sinusoid-maml-{1,5}step`` -- MLP 1-40-40-1 (ReLU), 25 tasks, 10 support + 10
  query shots, second-order MAML, inner lr 0.01, MSE (Finn et al. 2017's regression).
* (b) ``conv4-maml-{2nd,1st}`` -- 28x28 grayscale 5-way 1-shot, 15 queries per class,
  conv4 + linear head, 32 tasks, inner lr 0.4, 1 step, cross-entropy.
* (c) ``conv4-protonet`` -- the same episodes, ProtoNet on the conv4 encoder (no head).
* (d) ``sinusoid-metasgd-{1,5}step`` -- Meta-SGD (per-element learnable inner lrs,
  initialised to 0.01) on the sinusoid workload.
* (e) ``conv4-relationnet`` -- RelationNet on the same episodes, 16 tasks: conv4 feature
  maps ``[B, 64, 7, 7]`` (max-pooling in the first two blocks only, the paper's Omniglot
  encoder), easyfsl's default relation module, MSE of the scores against one-hot labels.
* (f) ``conv4-matchingnet`` -- MatchingNet with full context embeddings on the same
  episodes, 16 tasks: the conv4 encoder (64 features), a bidirectional LSTM over each
  support set and an attention LSTM cell for the queries, NLL of the log-probabilities.
* (m) ``conv4-maml-{5,10}step`` -- conv4, second order, long inner loops (memory/time).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta.algorithms.relationnet import default_relation_module, relation_mse_loss
from pymeta.data import Episode

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Problem:
    """What a library needs to build one meta-step.

    ``algorithm``: ``"maml"``, ``"metasgd"``, ``"protonet"``, ``"relationnet"`` or
    ``"matchingnet"``; ``lr``: the inner lr (the initial per-element lrs for Meta-SGD);
    ``n_way``: classes per task (metric learners); ``feature_dim``: the encoder's channels
    (RelationNet) or features (MatchingNet). ``model`` is the network, or for RelationNet
    and MatchingNet an ``nn.ModuleDict`` of the modules both libraries take, keyed by
    pymeta's argument names (``encoder``, ``relation_module``; ``encoder``,
    ``support_encoder``, ``query_encoder``).
    """

    algorithm: str
    model: nn.Module
    data: Episode
    loss_fn: LossFn
    lr: float = 0.0
    steps: int = 1
    first_order: bool = False
    n_way: int = 0
    feature_dim: int = 0


# --------------------------------------------------------------------------------------
# Data (fixed-seed generators: every library sees exactly the same tensors)
# --------------------------------------------------------------------------------------


def sinusoid_tasks(
    tasks: int = 25, shots: int = 10, queries: int = 10, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Episode:
    """Sinusoid regression tasks ``y = A sin(x - phase)`` (Finn et al. 2017).

    A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; shapes ``[T, S, 1]`` / ``[T, Q, 1]``.
    """
    g = torch.Generator().manual_seed(seed)
    amp = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=g)
    x = torch.empty(tasks, shots + queries, 1).uniform_(-5.0, 5.0, generator=g)
    y = amp * torch.sin(x - phase)
    x, y = x.to(dtype), y.to(dtype)
    return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def image_episodes(
    tasks: int = 32,
    n_way: int = 5,
    k_shot: int = 1,
    queries_per_class: int = 15,
    size: int = 28,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Episode:
    """N-way K-shot episodes of random ``size x size`` grayscale images in [0, 1).

    Labels are ``0..n_way-1`` grouped by class (support ``[T, N*K]``, query ``[T, N*Q]``).
    The pixels are noise: only shapes and arithmetic matter for timing and gradients.
    """
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(tasks, n_way * k_shot, 1, size, size, generator=g).to(dtype)
    query_x = torch.rand(tasks, n_way * queries_per_class, 1, size, size, generator=g).to(dtype)
    support_y = torch.arange(n_way).repeat_interleave(k_shot).expand(tasks, -1).contiguous()
    query_y = torch.arange(n_way).repeat_interleave(queries_per_class).expand(tasks, -1).contiguous()
    return Episode(support_x, support_y, query_x, query_y)


# --------------------------------------------------------------------------------------
# Models (built from a fixed seed: every library starts from the same weights)
# --------------------------------------------------------------------------------------


def _seeded(seed: int) -> contextlib.AbstractContextManager[Any]:
    """Build modules under ``seed`` (default PyTorch init) without touching the global RNG."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(seed)
    return stack


def make_mlp(seed: int = 0, hidden: int = 40, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The sinusoid MLP 1-40-40-1 with ReLU, default PyTorch init under ``seed``."""
    with _seeded(seed):
        model = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
    return model.to(dtype)


def make_conv4(
    n_way: int | None = 5,
    seed: int = 0,
    channels: int = 64,
    size: int = 28,
    dtype: torch.dtype = torch.float32,
    batch_norm: bool = True,
    maps: bool = False,
) -> nn.Module:
    """The conv4 backbone: 4 x [conv3x3(64, pad 1) - BatchNorm - ReLU - maxpool2], flatten,
    then ``Linear(features, n_way)`` unless ``n_way`` is None (encoder only, for ProtoNet).
    ``batch_norm=False`` puts ``nn.Identity`` in place of BatchNorm (same conv weights):
    for checks that must not depend on how a library batches BatchNorm statistics.
    ``maps=True`` (an encoder: ``n_way`` must be None) is RelationNet's: max-pooling in the
    first two blocks only and no flatten, ``[B, 64, 7, 7]`` feature maps for 28x28 inputs
    (Sung et al.'s Omniglot encoder, and ``pymeta train --algo relationnet``'s).

    BatchNorm uses batch statistics and keeps no running statistics
    (``track_running_stats=False``, as in learn2learn's own conv4 and the functorch MAML
    example), so every library -- including the ``vmap`` one, which cannot update
    buffers -- runs the same arithmetic. 28x28 grayscale inputs give 64 features.
    """
    if maps and n_way is not None:
        raise ValueError(f"make_conv4(maps=True) is an encoder: n_way must be None, got {n_way}")
    with _seeded(seed):
        layers: list[nn.Module] = []
        c_in, s = 1, size
        for block in range(4):
            norm = nn.BatchNorm2d(channels, track_running_stats=False) if batch_norm else nn.Identity()
            layers += [nn.Conv2d(c_in, channels, 3, padding=1), norm, nn.ReLU()]
            if not maps or block < 2:
                layers.append(nn.MaxPool2d(2))
                s //= 2
            c_in = channels
        if not maps:
            layers.append(nn.Flatten())
        if n_way is not None:
            layers.append(nn.Linear(channels * s * s, n_way))
        model = nn.Sequential(*layers)
    return model.to(dtype)


# --------------------------------------------------------------------------------------
# Problems: one function per kind of workload
# --------------------------------------------------------------------------------------


def sinusoid(
    algorithm: str, steps: int, *, tasks: int = 25, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Problem:
    """(a) MAML / (d) Meta-SGD on sinusoid regression: MLP 1-40-40-1, 10 + 10 shots,
    second order, inner lr 0.01, MSE."""
    data = sinusoid_tasks(tasks, 10, 10, seed=seed, dtype=dtype)
    return Problem(algorithm, make_mlp(seed, dtype=dtype), data, F.mse_loss, lr=0.01, steps=steps)


def conv4_maml(
    steps: int, first_order: bool, *, tasks: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Problem:
    """(b), (m) MAML on 28x28 grayscale 5-way 1-shot, 15 queries per class, conv4 + linear
    head, inner lr 0.4, cross-entropy."""
    data = image_episodes(tasks, seed=seed, dtype=dtype)
    model = make_conv4(5, seed, dtype=dtype)
    return Problem("maml", model, data, F.cross_entropy, lr=0.4, steps=steps, first_order=first_order)


def conv4_protonet(
    *, tasks: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0, batch_norm: bool = True
) -> Problem:
    """(c) ProtoNet on the conv4 encoder (no head), the episodes of :func:`conv4_maml`."""
    data = image_episodes(tasks, seed=seed, dtype=dtype)
    encoder = make_conv4(None, seed, dtype=dtype, batch_norm=batch_norm)
    return Problem("protonet", encoder, data, F.cross_entropy, n_way=5)


def conv4_relationnet(*, tasks: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    """(e) RelationNet on the episodes of :func:`conv4_maml`: conv4 feature maps
    ``[B, 64, 7, 7]`` (``make_conv4(maps=True)``), the paper's relation module as easyfsl
    builds it (:func:`pymeta.algorithms.relationnet.default_relation_module`: BatchNorm
    with running statistics, momentum 1), MSE of the scores against one-hot labels."""
    data = image_episodes(tasks, seed=seed, dtype=dtype)
    encoder = make_conv4(None, seed, dtype=dtype, maps=True)
    with _seeded(seed):
        relation = default_relation_module(64).to(dtype)
    model = nn.ModuleDict({"encoder": encoder, "relation_module": relation})
    return Problem("relationnet", model, data, relation_mse_loss, n_way=5, feature_dim=64)


def conv4_matchingnet(*, tasks: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    """(f) MatchingNet with full context embeddings on the episodes of :func:`conv4_maml`:
    the conv4 encoder (64 features), ``LSTM(64, 64, bidirectional)`` over each support set,
    ``LSTMCell(128, 64)`` attending over it for the queries (easyfsl's defaults), NLL of
    the log-probabilities."""
    data = image_episodes(tasks, seed=seed, dtype=dtype)
    encoder = make_conv4(None, seed, dtype=dtype)
    with _seeded(seed):
        support = nn.LSTM(64, 64, batch_first=True, bidirectional=True).to(dtype)
        query = nn.LSTMCell(128, 64).to(dtype)
    model = nn.ModuleDict({"encoder": encoder, "support_encoder": support, "query_encoder": query})
    return Problem("matchingnet", model, data, F.nll_loss, n_way=5, feature_dim=64)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

MAML_LIBRARIES = ("pymeta", "learn2learn", "higher", "torch.func")
# The compiled variants (torch.compile around each library's meta-loss function).
COMPILED = ("pymeta[compile=1]", "learn2learn[compile=1]", "torch.func[compile=1]")


@dataclass(frozen=True)
class Workload:
    """A named benchmark configuration.

    ``make(tasks=..., dtype=...)`` gives its :class:`Problem`; ``libraries`` are the ones
    run by default; ``pymeta_options`` are pymeta's defaults here (e.g. ``task_chunk=1``:
    learn2learn's per-task memory); ``grad_tol`` the float32 meta-gradient agreement
    with the baseline, relative to its largest entry.
    """

    name: str
    group: str
    description: str
    make: Callable[..., Problem]
    libraries: tuple[str, ...]
    grad_tol: float
    pymeta_options: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        """The library speed-ups and gradients are compared with."""
        return "easyfsl" if "easyfsl" in self.libraries else "learn2learn"

    @property
    def algorithm(self) -> str:
        """``Problem.algorithm``: ``"maml"``, ``"metasgd"``, ``"protonet"``, ..."""
        return self.problem(tasks=1).algorithm

    def problem(
        self, *, tasks: int | None = None, device: torch.device | str = "cpu", **kwargs: Any
    ) -> Problem:
        """This workload's problem with ``tasks`` tasks (default: the workload's), the
        model and episodes on ``device``; ``kwargs`` go to ``make`` (``dtype``, ...)."""
        p = self.make(**kwargs, **({} if tasks is None else {"tasks": tasks}))
        return replace(p, model=p.model.to(device), data=p.data.to(device))


_SIN = "sinusoid MLP 1-40-40-1, 25 tasks, 10+10 shots"
_EPISODES = "5-way 1-shot 28x28, 15 queries/class"
_CONV4 = f"{_EPISODES}, conv4, 32 tasks"
_EASYFSL = ("pymeta", "easyfsl")
_FULL = (*MAML_LIBRARIES, *COMPILED)
# Long inner loops at lr 0.4 amplify float32 rounding: at 5 steps and 32 tasks
# learn2learn's own float32 meta-gradient is 3.4e-4 (pymeta's 3.9e-4) from the float64
# one, while the float64 gradients agree to 2e-14 (bench_meta.py's float64 check).
_LONG_TOL = 1e-2

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("sinusoid-maml-1step", "a", f"{_SIN}, 2nd-order MAML, 1 step", partial(sinusoid, "maml", 1), _FULL, 1e-5),
        Workload("sinusoid-maml-5step", "a", f"{_SIN}, 2nd-order MAML, 5 steps", partial(sinusoid, "maml", 5), _FULL, 1e-4),
        # pymeta on conv4: meta_loss with one task per chunk, learn2learn's memory footprint.
        Workload("conv4-maml-2nd", "b", f"{_CONV4}, 2nd-order MAML", partial(conv4_maml, 1, False), _FULL, 1e-4,
           {"task_chunk": 1}),
        Workload("conv4-maml-1st", "b", f"{_CONV4}, 1st-order MAML", partial(conv4_maml, 1, True), _FULL, 1e-4,
           {"task_chunk": 1}),
        # pymeta: meta_loss one task per chunk, easyfsl's per-task memory.
        Workload("conv4-protonet", "c", f"{_CONV4} (encoder), ProtoNet", conv4_protonet, _EASYFSL, 1e-4,
           {"task_chunk": 1}),
        Workload("sinusoid-metasgd-1step", "d", f"{_SIN}, Meta-SGD, 1 step", partial(sinusoid, "metasgd", 1), _FULL, 1e-5),
        Workload("sinusoid-metasgd-5step", "d", f"{_SIN}, Meta-SGD, 5 steps", partial(sinusoid, "metasgd", 5), _FULL, 1e-4),
        # pymeta: one task per chunk, as the memory target is easyfsl's per-task peak (all 16
        # tasks at once hold 16 encoder graphs: ~14x easyfsl's peak, and no faster on CPU).
        Workload("conv4-relationnet", "e", f"{_EPISODES}, 16 tasks, RelationNet (conv4 maps 64x7x7, MSE)",
           conv4_relationnet, _EASYFSL, 1e-4, {"task_chunk": 1}),
        # pymeta: one task per chunk too: all 16 tasks at once hold 16 encoder graphs (14x
        # easyfsl's peak) and ran slower on CPU (1 thread: 1.6 s per chunk of one, 2.3 s for
        # all at once lowered), the conv4 encoder, not the LSTMs, being the step's cost.
        Workload("conv4-matchingnet", "f", f"{_EPISODES}, 16 tasks, MatchingNet (conv4, FCE, NLL)",
           conv4_matchingnet, _EASYFSL, 1e-4, {"task_chunk": 1}),
        # Long inner loops: memory/time of pymeta[checkpoint_steps=1] vs plain, per step count.
        Workload("conv4-maml-5step", "m", "conv4 as above, 2nd-order MAML, 5 inner steps", partial(conv4_maml, 5, False),
           ("pymeta", "learn2learn"), _LONG_TOL, {"task_chunk": 1}),
        Workload("conv4-maml-10step", "m", "conv4 as above, 2nd-order MAML, 10 inner steps", partial(conv4_maml, 10, False),
           ("pymeta", "learn2learn"), _LONG_TOL, {"task_chunk": 1}),
    ]
}  # fmt: skip

GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(w.name for w in WORKLOADS.values() if w.group == group)
    for group in dict.fromkeys(w.group for w in WORKLOADS.values())
}
