"""Peer meta-learners for the side-by-side benchmarks, on identical data and hyperparameters.

Every workload builder takes a peer name and returns a :class:`MetaStep` ``(step, params)``:
``step()`` runs one full meta-step -- the inner loop over all tasks, the query loss and its
``backward()`` -- but *not* the outer optimizer step, so timings compare like with like.
After ``step()`` each tensor in ``params`` holds the meta-gradient of the mean query loss
over tasks in ``.grad`` (gradients are reset to ``None`` at the start of every call).

Workloads (see :data:`WORKLOADS`):

* ``sinusoid_maml``   -- MLP 1-40-40-1 (ReLU), 25 tasks, 10 support + 10 query shots,
  second-order MAML, inner lr 0.01, 1 or 5 inner steps, MSE loss.
* ``conv4_maml``      -- 28x28 grayscale 5-way 1-shot, 15 queries per class, conv4 + linear
  head, 32 tasks, MAML inner lr 0.4, 1 inner step, second- or first-order, cross-entropy.
* ``conv4_protonet``  -- the same episodes, ProtoNet on the conv4 encoder (no head),
  easyfsl's ``PrototypicalNetworks``, one task at a time as easyfsl does.
* ``sinusoid_metasgd`` -- Meta-SGD (learnable per-element inner lrs, initialised to 0.01)
  on the sinusoid workload.

Peers:

* ``"learn2learn"`` -- ``learn2learn.algorithms.MAML`` / ``MetaSGD``: ``clone()`` +
  ``adapt()`` per task, ``(query_loss / T).backward()`` per task (learn2learn's examples).
* ``"higher"``      -- ``higher.innerloop_ctx(copy_initial_weights=False,
  track_higher_grads=True)`` per task, ``(query_loss / T).backward()`` per task (higher's
  examples). First order: a ``grad_callback`` that detaches the inner gradients. Meta-SGD:
  one SGD param group per tensor and the learnable lrs passed as ``override={"lr": ...}``.
* ``"torch.func"``  -- the hand-written functional version: ``vmap`` over tasks of an inner
  loop written with ``torch.func.grad`` + ``functional_call``, one ``mean().backward()``.
  Its second-order meta-gradient through BatchNorm (conv4) is *wrong* (pytorch/functorch
  issue 534, DESIGN.md "Known traps"); that is expected and only measured here.
* ``"easyfsl"``     -- ``easyfsl.methods.PrototypicalNetworks`` (``conv4_protonet`` only).
* ``"pymeta"``      -- this library, every workload: ``pymeta.MAML`` / ``MetaSGD`` /
  ``ProtoNet(metric="euclidean", batch_stats="separate")`` (easyfsl's BatchNorm batches),
  one batched ``episode(support_x, support_y, query_x)``
  over all tasks, the mean query loss, one ``backward()``. Execution strategy ``"auto"`` by
  default (measured on the first calls; ``MetaStep.strategy()`` says what it chose).

Every builder takes ``device`` (default ``"cpu"``): the data are generated on the CPU
from the fixed seeds, then the episodes and the model are moved to ``device`` before the
peer is built, so every peer on every device starts from the same numbers.

Peer libraries (pymeta too) are imported lazily inside the builders; a missing or broken
one raises :class:`PeerUnavailable` so a driver reports ``skipped: <reason>`` and never
fakes a number. This module itself imports only ``torch`` (and ``measure.py`` beside it)
and so is importable from any Python with torch.

Measurement helpers (:func:`count_aten_ops`, :func:`peak_memory`, :func:`flops`) live in
``benchmarks/measure.py`` and are re-exported here.

Run ``python benchmarks/peers.py`` (ideally with the peers venv's Python, see
``benchmarks/README.md``) for a smoke check: every peer's meta-step runs, the peers'
meta-gradients agree, and one wall time per peer and workload is printed.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # run as a script from benchmarks/, or imported with benchmarks/ on sys.path
    from measure import OpCount, count_aten_ops, flops, peak_memory
except ImportError:  # imported as benchmarks.peers from the repository root
    from benchmarks.measure import OpCount, count_aten_ops, flops, peak_memory

__all__ = [
    "PEERS",
    "WORKLOADS",
    "Episodes",
    "MetaStep",
    "OpCount",
    "PeerUnavailable",
    "Workload",
    "conv4_maml",
    "conv4_protonet",
    "count_aten_ops",
    "flat_grad",
    "flops",
    "image_episodes",
    "make_conv4",
    "make_mlp",
    "parse_peer",
    "peak_memory",
    "protonet_logits",
    "sinusoid_maml",
    "sinusoid_metasgd",
    "sinusoid_tasks",
]


# --------------------------------------------------------------------------------------
# Errors and return types
# --------------------------------------------------------------------------------------


class PeerUnavailable(RuntimeError):
    """A peer library cannot run here (not installed, fails to import, or unsupported)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class MetaStep(NamedTuple):
    """One peer's meta-step: ``step()`` runs it, ``params`` receive the meta-gradients.

    ``strategy`` (pymeta only) returns the execution strategy in use: ``None`` while
    ``"auto"`` is still measuring its candidates, then the one it chose.
    """

    step: Callable[[], None]
    params: list[Tensor]
    strategy: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Episodes:
    """A meta-batch of T tasks: support ``[T, S, ...]`` and query ``[T, Q, ...]``."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        """Number of tasks T in the meta-batch."""
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> Episodes:
        """The same episodes with every tensor on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.support_x.device == device:
            return self
        return Episodes(*(t.to(device) for t in (self.support_x, self.support_y,
                                                  self.query_x, self.query_y)))  # fmt: skip


# --------------------------------------------------------------------------------------
# Data (fixed-seed generators: every peer sees exactly the same tensors)
# --------------------------------------------------------------------------------------


def sinusoid_tasks(
    tasks: int = 25,
    shots: int = 10,
    queries: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Episodes:
    """Sinusoid regression tasks ``y = A sin(x - phase)`` (Finn et al. 2017).

    A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; shapes ``[T, S, 1]`` / ``[T, Q, 1]``.
    """
    g = torch.Generator().manual_seed(seed)
    amp = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=g)
    x = torch.empty(tasks, shots + queries, 1).uniform_(-5.0, 5.0, generator=g)
    y = amp * torch.sin(x - phase)
    x, y = x.to(dtype), y.to(dtype)
    return Episodes(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def image_episodes(
    tasks: int = 32,
    n_way: int = 5,
    k_shot: int = 1,
    queries_per_class: int = 15,
    size: int = 28,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Episodes:
    """N-way K-shot episodes of random ``size x size`` grayscale images in [0, 1).

    Labels are ``0..n_way-1`` grouped by class (support ``[T, N*K]``, query ``[T, N*Q]``).
    The pixels are noise: only shapes and arithmetic matter for timing and gradients.
    """
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(tasks, n_way * k_shot, 1, size, size, generator=g).to(dtype)
    query_x = torch.rand(tasks, n_way * queries_per_class, 1, size, size, generator=g).to(dtype)
    support_y = torch.arange(n_way).repeat_interleave(k_shot).expand(tasks, -1).contiguous()
    query_y = (
        torch.arange(n_way).repeat_interleave(queries_per_class).expand(tasks, -1).contiguous()
    )
    return Episodes(support_x, support_y, query_x, query_y)


# --------------------------------------------------------------------------------------
# Models (built from a fixed seed: every peer starts from the same weights)
# --------------------------------------------------------------------------------------


def make_mlp(seed: int = 0, hidden: int = 40, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The sinusoid MLP 1-40-40-1 with ReLU, default PyTorch init under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(1, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
    return model.to(dtype)


def make_conv4(
    n_way: int | None = 5,
    seed: int = 0,
    channels: int = 64,
    in_channels: int = 1,
    size: int = 28,
    dtype: torch.dtype = torch.float32,
    batch_norm: bool = True,
) -> nn.Module:
    """The conv4 backbone: 4 x [conv3x3(64, pad 1) - BatchNorm - ReLU - maxpool2], flatten,
    then ``Linear(features, n_way)`` unless ``n_way`` is None (encoder only, for ProtoNet).
    ``batch_norm=False`` puts ``nn.Identity`` in place of BatchNorm (same conv weights):
    for checks that must not depend on how a library batches BatchNorm statistics.

    BatchNorm uses batch statistics and keeps no running statistics
    (``track_running_stats=False``, as in learn2learn's own conv4 and the functorch MAML
    example), so every peer -- including the ``vmap`` one, which cannot update buffers --
    runs the same arithmetic. 28x28 inputs give 64 features.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        c_in, s = in_channels, size
        for _ in range(4):
            layers += [
                nn.Conv2d(c_in, channels, 3, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False)
                if batch_norm
                else nn.Identity(),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in, s = channels, s // 2
        layers.append(nn.Flatten())
        if n_way is not None:
            layers.append(nn.Linear(channels * s * s, n_way))
        model = nn.Sequential(*layers)
    return model.to(dtype)


# --------------------------------------------------------------------------------------
# Lazy peer imports
# --------------------------------------------------------------------------------------


def _import_peer(name: str, module: str) -> Any:
    """Import a peer library lazily; raise :class:`PeerUnavailable` if it cannot be used."""
    import importlib

    try:
        # learn2learn imports gym, which prints an "unmaintained" notice to stderr.
        with contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        raise PeerUnavailable(name, f"cannot import {module}: {type(exc).__name__}: {exc}") from exc


def _zero_grads(params: Sequence[Tensor]) -> None:
    """Drop accumulated gradients (no ATen op is dispatched for this)."""
    for p in params:
        p.grad = None


def _unknown(workload: str, peer: str) -> PeerUnavailable:
    """The error for a peer that has no implementation of a workload."""
    return PeerUnavailable(peer, f"no {peer!r} implementation of workload {workload!r}")


# --------------------------------------------------------------------------------------
# Generic MAML peers (shared by the sinusoid and conv4 workloads)
# --------------------------------------------------------------------------------------

LossFn = Callable[[Tensor, Tensor], Tensor]


def _maml_learn2learn(
    model: nn.Module, data: Episodes, lr: float, steps: int, first_order: bool, loss_fn: LossFn
) -> MetaStep:
    """learn2learn ``MAML``: ``clone()`` / ``adapt()`` per task, backward per task."""
    l2l = _import_peer("learn2learn", "learn2learn")
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    params = list(maml.parameters())
    sx, sy, qx, qy = data.support_x, data.support_y, data.query_x, data.query_y
    num_tasks = data.num_tasks

    def step() -> None:
        _zero_grads(params)
        for t in range(num_tasks):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(loss_fn(learner(sx[t]), sy[t]))
            (loss_fn(learner(qx[t]), qy[t]) / num_tasks).backward()

    return MetaStep(step, params)


def _maml_higher(
    model: nn.Module, data: Episodes, lr: float, steps: int, first_order: bool, loss_fn: LossFn
) -> MetaStep:
    """higher ``innerloop_ctx`` per task (first order: detaching ``grad_callback``)."""
    higher = _import_peer("higher", "higher")
    params = list(model.parameters())
    inner_opt = torch.optim.SGD(params, lr=lr)
    sx, sy, qx, qy = data.support_x, data.support_y, data.query_x, data.query_y
    num_tasks = data.num_tasks

    def detach_grads(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        return [None if g is None else g.detach() for g in grads]

    callback = detach_grads if first_order else None

    def step() -> None:
        _zero_grads(params)
        for t in range(num_tasks):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=True
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(sx[t]), sy[t]), grad_callback=callback)
                (loss_fn(fmodel(qx[t]), qy[t]) / num_tasks).backward()

    return MetaStep(step, params)


def _maml_torch_func(
    model: nn.Module,
    data: Episodes,
    lr: float | dict[str, Tensor],
    steps: int,
    first_order: bool,
    loss_fn: LossFn,
) -> MetaStep:
    """vmap over tasks of a torch.func.grad inner loop; ``lr`` may be per-element tensors
    (Meta-SGD), which then also receive meta-gradients."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    replace_all_batch_norm_modules_(model)  # no running-stat updates under vmap
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def inner_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (p, buffers), (x,)), y)

    def query_loss(
        p: dict[str, Tensor], lrs: Any, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        fast = p
        for _ in range(steps):
            g = grad(inner_loss)(fast, sx, sy)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            if isinstance(lrs, dict):
                fast = {k: fast[k] - lrs[k] * g[k] for k in fast}
            else:
                fast = {k: fast[k] - lrs * g[k] for k in fast}
        return inner_loss(fast, qx, qy)

    batched = vmap(query_loss, in_dims=(None, None, 0, 0, 0, 0))
    meta_params = list(params.values())
    if isinstance(lr, dict):
        meta_params += list(lr.values())
    sx, sy, qx, qy = data.support_x, data.support_y, data.query_x, data.query_y

    def step() -> None:
        _zero_grads(meta_params)
        batched(params, lr, sx, sy, qx, qy).mean().backward()

    return MetaStep(step, meta_params)


def _maml_pymeta(
    model: nn.Module,
    data: Episodes,
    lr: float,
    steps: int,
    first_order: bool,
    loss_fn: LossFn,
    metasgd: bool = False,
    *,
    strategy: str = "auto",
    task_chunk: int | None = None,
    checkpoint_steps: bool = False,
    cuda_graph: bool = False,
) -> MetaStep:
    """pymeta ``MAML`` (or ``MetaSGD``): one batched ``episode`` over all tasks, the mean
    query loss over tasks, one ``backward()``.

    pymeta's options (the ``pymeta[...]`` peer names): ``strategy``; ``task_chunk``:
    gradients taken chunk by chunk in ``meta_loss``, one chunk's graph in memory;
    ``checkpoint_steps``: recompute inner steps in backward; ``cuda_graph``: the step is
    captured once as a CUDA graph (:class:`pymeta.CUDAGraphStep`) and replayed.

    With equally many queries per task, ``loss_fn`` (mean reduction) of the flattened
    ``[T * Q, ...]`` predictions is the mean over tasks of the per-task query losses, as
    the per-task peers compute it.
    """
    pymeta = _import_peer("pymeta", "pymeta")
    cls = pymeta.MetaSGD if metasgd else pymeta.MAML
    algo = cls(model, lr=lr, first_order=first_order, steps=steps, loss_fn=loss_fn,
               strategy=strategy, checkpoint_steps=bool(checkpoint_steps), task_chunk=task_chunk)  # fmt: skip
    params = list(algo.parameters())  # the model's, then (Meta-SGD) the lrs: learn2learn's order
    return _pymeta_step(algo, data, loss_fn, params, cuda_graph, lambda: algo.strategy)


def _pymeta_step(
    learner: nn.Module,
    data: Episodes,
    loss_fn: LossFn,
    params: list[Tensor],
    cuda_graph: bool,
    strategy: Callable[[], str | None],
) -> MetaStep:
    """The meta-step of a pymeta learner: ``episode_loss(...).backward()``, or a replay of
    it captured as a CUDA graph (which needs the data on a CUDA device)."""
    pymeta = _import_peer("pymeta", "pymeta")
    batch = (data.support_x, data.support_y, data.query_x, data.query_y)
    if cuda_graph:
        if data.support_x.device.type != "cuda":
            raise PeerUnavailable("pymeta[cuda_graph=1]", "CUDA graphs need a CUDA device (--device cuda)")
        graphed = pymeta.CUDAGraphStep(learner, batch, loss_fn=loss_fn)

        def step_graphed() -> None:
            graphed(*batch)

        return MetaStep(step_graphed, params, strategy)

    def step() -> None:
        _zero_grads(params)
        pymeta.algorithms.episode_loss(learner, *batch, loss_fn).backward()

    return MetaStep(step, params, strategy)


def _maml(
    workload: str,
    peer: str,
    model: nn.Module,
    data: Episodes,
    lr: float,
    steps: int,
    first_order: bool,
    loss_fn: LossFn,
    **options: Any,
) -> MetaStep:
    """Dispatch a MAML workload to the peer's implementation (``options``: pymeta's)."""
    if peer == "pymeta":
        return _maml_pymeta(model, data, lr, steps, first_order, loss_fn, **options)
    if peer == "learn2learn":
        return _maml_learn2learn(model, data, lr, steps, first_order, loss_fn)
    if peer == "higher":
        return _maml_higher(model, data, lr, steps, first_order, loss_fn)
    if peer == "torch.func":
        return _maml_torch_func(model, data, lr, steps, first_order, loss_fn)
    raise _unknown(workload, peer)


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


def sinusoid_maml(
    peer: str,
    steps: int = 1,
    *,
    first_order: bool = False,
    tasks: int = 25,
    shots: int = 10,
    queries: int = 10,
    lr: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **options: Any,
) -> MetaStep:
    """(a) Sinusoid regression, MLP 1-40-40-1, MAML (second order by default), MSE loss.

    ``options`` are pymeta's (:func:`_maml_pymeta`; the other peers ignore them); data
    and model go to ``device``.
    """
    data = sinusoid_tasks(tasks, shots, queries, seed=seed, dtype=dtype).to(device)
    model = make_mlp(seed=seed, dtype=dtype).to(device)
    return _maml("sinusoid_maml", peer, model, data, lr, steps, first_order, F.mse_loss, **options)


def conv4_maml(
    peer: str,
    first_order: bool = False,
    *,
    steps: int = 1,
    tasks: int = 32,
    n_way: int = 5,
    k_shot: int = 1,
    queries_per_class: int = 15,
    lr: float = 0.4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **options: Any,
) -> MetaStep:
    """(b) 28x28 grayscale 5-way 1-shot, conv4 + linear head, MAML, cross-entropy.

    ``options`` are pymeta's (:func:`_maml_pymeta`; the other peers ignore them); data
    and model go to ``device``.
    """
    data = image_episodes(tasks, n_way, k_shot, queries_per_class, seed=seed, dtype=dtype)
    data = data.to(device)
    model = make_conv4(n_way, seed=seed, dtype=dtype).to(device)
    return _maml("conv4_maml", peer, model, data, lr, steps, first_order, F.cross_entropy, **options)


def _protonet_model(
    peer: str, encoder: nn.Module, n_way: int, strategy: str = "auto", task_chunk: int | None = None
) -> tuple[nn.Module, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """``(module, logits)`` of a ProtoNet peer: ``logits(sx, sy, qx)`` gives ``[T, Q, N]``
    negative plain Euclidean distances of each query to its task's class means.

    Both embed a task's support and query images in separate encoder calls, so BatchNorm
    normalises each with its own statistics (pymeta: ``batch_stats="separate"``).
    ``strategy`` and ``task_chunk`` are pymeta's options (ignored by easyfsl); pymeta is
    told ``n_way`` (easyfsl infers it from the labels)."""
    if peer == "easyfsl":
        methods = _import_peer("easyfsl", "easyfsl.methods")
        model = methods.PrototypicalNetworks(encoder)

        def logits_easyfsl(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            out = []
            for t in range(sx.shape[0]):
                model.process_support_set(sx[t], sy[t])
                out.append(model(qx[t]))
            return torch.stack(out)

        return model, logits_easyfsl
    if peer == "pymeta":
        pymeta = _import_peer("pymeta", "pymeta")
        proto = pymeta.ProtoNet(encoder, metric="euclidean", batch_stats="separate", strategy=strategy, n_way=n_way,
                                task_chunk=task_chunk)
        return proto, proto.episode
    raise _unknown("conv4_protonet", peer)


def conv4_protonet(
    peer: str,
    *,
    tasks: int = 32,
    n_way: int = 5,
    k_shot: int = 1,
    queries_per_class: int = 15,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    batch_norm: bool = True,
    strategy: str = "auto",
    task_chunk: int | None = None,
    cuda_graph: bool = False,
    device: torch.device | str = "cpu",
) -> MetaStep:
    """(c) ProtoNet on the conv4 encoder (no head), same episodes as :func:`conv4_maml`.

    easyfsl: ``model.process_support_set(support_x, support_y)`` then ``model(query_x)``,
    scores are *negative plain Euclidean* distances (``-torch.cdist``), one task at a time,
    ``(cross_entropy / T).backward()`` per task. The encoder runs separately on support and
    query images (BatchNorm statistics per call), as easyfsl does.

    pymeta: ``ProtoNet(encoder, metric="euclidean", batch_stats="separate",
    strategy=strategy, n_way=n_way)``, one ``episode`` over all tasks, the mean
    cross-entropy, one ``backward()`` (``task_chunk``: ``meta_loss`` takes the gradient
    chunk by chunk, easyfsl's memory at 1; ``cuda_graph``: captured as a CUDA graph and
    replayed, :class:`pymeta.CUDAGraphStep`). ``batch_stats="separate"`` embeds each task's support and query images
    in separate encoder batches, as easyfsl does, so the logits agree with easyfsl's to
    float32 rounding (pymeta's default, ``"joint"``, takes BatchNorm statistics over
    both). ``strategy`` (``"auto"``, ``"vmap"``, ``"loop"``, ...) is how pymeta runs the
    encoder on all tasks; ``batch_norm=False`` (``nn.Identity`` in place of BatchNorm)
    leaves nothing to choose: all tasks' images run as one batch. Data and encoder go to
    ``device``.
    """
    data = image_episodes(tasks, n_way, k_shot, queries_per_class, seed=seed, dtype=dtype)
    data = data.to(device)
    encoder = make_conv4(None, seed=seed, dtype=dtype, batch_norm=batch_norm).to(device)
    model, _ = _protonet_model(peer, encoder, n_way, strategy, task_chunk)
    params = list(model.parameters())
    sx, sy, qx, qy = data.support_x, data.support_y, data.query_x, data.query_y
    num_tasks = data.num_tasks

    if peer == "pymeta":
        strategy_of = (lambda: model.strategy) if batch_norm else (lambda: "one batch")
        return _pymeta_step(model, data, F.cross_entropy, params, cuda_graph, strategy_of)

    def step() -> None:
        _zero_grads(params)
        for t in range(num_tasks):
            model.process_support_set(sx[t], sy[t])
            scores = model(qx[t])
            (F.cross_entropy(scores, qy[t]) / num_tasks).backward()

    return MetaStep(step, params)


def protonet_logits(
    peer: str,
    *,
    tasks: int = 32,
    n_way: int = 5,
    k_shot: int = 1,
    queries_per_class: int = 15,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    batch_norm: bool = True,
    strategy: str = "auto",
    device: torch.device | str = "cpu",
) -> Tensor:
    """The ``[T, Q, N]`` logits (no gradient, on ``device``) of ``peer``'s ProtoNet on the
    episodes and encoder of :func:`conv4_protonet` with the same arguments."""
    data = image_episodes(tasks, n_way, k_shot, queries_per_class, seed=seed, dtype=dtype)
    data = data.to(device)
    encoder = make_conv4(None, seed=seed, dtype=dtype, batch_norm=batch_norm).to(device)
    _, logits = _protonet_model(peer, encoder, n_way, strategy)
    with torch.no_grad():
        return logits(data.support_x, data.support_y, data.query_x)


def sinusoid_metasgd(
    peer: str,
    steps: int = 1,
    *,
    first_order: bool = False,
    tasks: int = 25,
    shots: int = 10,
    queries: int = 10,
    lr: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **options: Any,
) -> MetaStep:
    """(d) Meta-SGD on the sinusoid workload: per-element learnable inner lrs (init ``lr``).

    ``params`` are the model's parameters followed by the lrs (learn2learn's order).
    ``options`` are pymeta's (:func:`_maml_pymeta`; the other peers ignore them); data,
    model and learnable lrs are on ``device``.
    """
    data = sinusoid_tasks(tasks, shots, queries, seed=seed, dtype=dtype).to(device)
    model = make_mlp(seed=seed, dtype=dtype).to(device)
    sx, sy, qx, qy = data.support_x, data.support_y, data.query_x, data.query_y
    num_tasks = data.num_tasks
    loss_fn = F.mse_loss

    if peer == "pymeta":
        return _maml_pymeta(model, data, lr, steps, first_order, loss_fn, metasgd=True, **options)

    if peer == "learn2learn":
        l2l = _import_peer("learn2learn", "learn2learn")
        metasgd = l2l.algorithms.MetaSGD(model, lr=lr, first_order=first_order)
        params = list(metasgd.parameters())

        def step_l2l() -> None:
            _zero_grads(params)
            for t in range(num_tasks):
                learner = metasgd.clone()
                for _ in range(steps):
                    learner.adapt(loss_fn(learner(sx[t]), sy[t]))
                (loss_fn(learner(qx[t]), qy[t]) / num_tasks).backward()

        return MetaStep(step_l2l, params)

    if peer == "higher":
        higher = _import_peer("higher", "higher")
        model_params = list(model.parameters())
        lrs = [nn.Parameter(torch.full_like(p, lr)) for p in model_params]
        inner_opt = torch.optim.SGD([{"params": [p]} for p in model_params], lr=lr)
        params = model_params + lrs

        def detach_grads(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
            return [None if g is None else g.detach() for g in grads]

        callback = detach_grads if first_order else None

        def step_higher() -> None:
            _zero_grads(params)
            for t in range(num_tasks):
                with higher.innerloop_ctx(
                    model,
                    inner_opt,
                    copy_initial_weights=False,
                    override={"lr": lrs},
                    track_higher_grads=True,
                ) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(loss_fn(fmodel(sx[t]), sy[t]), grad_callback=callback)
                    (loss_fn(fmodel(qx[t]), qy[t]) / num_tasks).backward()

        return MetaStep(step_higher, params)

    if peer == "torch.func":
        lr_dict = {k: nn.Parameter(torch.full_like(p, lr)) for k, p in model.named_parameters()}
        return _maml_torch_func(model, data, lr_dict, steps, first_order, loss_fn)

    raise _unknown("sinusoid_metasgd", peer)


@dataclass(frozen=True)
class Workload:
    """A named benchmark configuration: ``builder(peer, **kwargs)`` gives a MetaStep."""

    name: str
    builder: Callable[..., MetaStep]
    kwargs: dict[str, Any]
    peers: tuple[str, ...]
    description: str

    def build(self, peer: str, **overrides: Any) -> MetaStep:
        """Build this workload's meta-step for ``peer`` (raises PeerUnavailable).

        ``peer`` may carry a pymeta strategy, ``"pymeta[vmap]"`` / ``"pymeta[loop]"``
        (:func:`parse_peer`); plain ``"pymeta"`` uses ``"auto"``.
        """
        base, extra = parse_peer(peer)
        if base not in self.peers:
            raise _unknown(self.name, peer)
        return self.builder(base, **{**self.kwargs, **extra, **overrides})


def parse_peer(name: str) -> tuple[str, dict[str, Any]]:
    """Split a pymeta peer name with options: ``"pymeta[loop]"`` ->
    ``("pymeta", {"strategy": "loop"})``, ``"pymeta[lowered,task_chunk=1]"`` ->
    ``("pymeta", {"strategy": "lowered", "task_chunk": 1})``; a bare word is the strategy,
    ``key=value`` an integer option of the builder. Other names -> ``(name, {})``."""
    if not (name.endswith("]") and "[" in name):
        return name, {}
    base, inside = name[:-1].split("[", 1)
    if base != "pymeta":
        raise PeerUnavailable(name, "only pymeta takes [options]")
    options: dict[str, Any] = {}
    for item in filter(None, inside.split(",")):
        key, sep, value = item.partition("=")
        options.update({key: int(value)} if sep else {"strategy": item})
    return base, options


_MAML_PEERS = ("pymeta", "learn2learn", "higher", "torch.func")

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("sinusoid-maml-1step", sinusoid_maml, {"steps": 1}, _MAML_PEERS,
                 "sinusoid MLP 1-40-40-1, 25 tasks, 10+10 shots, 2nd-order MAML, 1 step"),
        Workload("sinusoid-maml-5step", sinusoid_maml, {"steps": 5}, _MAML_PEERS,
                 "sinusoid MLP 1-40-40-1, 25 tasks, 10+10 shots, 2nd-order MAML, 5 steps"),
        # pymeta on conv4: meta_loss with one task per chunk, learn2learn's memory footprint
        # (on CPU the per-task loop is the faster strategy anyway, so it costs no speed).
        Workload("conv4-maml-2nd", conv4_maml, {"first_order": False, "task_chunk": 1}, _MAML_PEERS,
                 "5-way 1-shot 28x28, 15 queries/class, conv4, 32 tasks, 2nd-order MAML"),
        Workload("conv4-maml-1st", conv4_maml, {"first_order": True, "task_chunk": 1}, _MAML_PEERS,
                 "5-way 1-shot 28x28, 15 queries/class, conv4, 32 tasks, 1st-order MAML"),
        # Long inner loops: memory/time of pymeta[checkpoint_steps=1] vs plain, per step count.
        Workload("conv4-maml-5step", conv4_maml, {"steps": 5, "task_chunk": 1}, ("pymeta", "learn2learn"),
                 "conv4 as above, 2nd-order MAML, 5 inner steps"),
        Workload("conv4-maml-10step", conv4_maml, {"steps": 10, "task_chunk": 1}, ("pymeta", "learn2learn"),
                 "conv4 as above, 2nd-order MAML, 10 inner steps"),
        # pymeta: meta_loss one task per chunk, easyfsl's per-task memory at the same speed.
        Workload("conv4-protonet", conv4_protonet, {"task_chunk": 1}, ("pymeta", "easyfsl"),
                 "5-way 1-shot 28x28, 15 queries/class, conv4 encoder, 32 tasks, ProtoNet"),
        Workload("sinusoid-metasgd-1step", sinusoid_metasgd, {"steps": 1}, _MAML_PEERS,
                 "sinusoid MLP 1-40-40-1, 25 tasks, 10+10 shots, Meta-SGD, 1 step"),
        Workload("sinusoid-metasgd-5step", sinusoid_metasgd, {"steps": 5}, _MAML_PEERS,
                 "sinusoid MLP 1-40-40-1, 25 tasks, 10+10 shots, Meta-SGD, 5 steps"),
    ]
}  # fmt: skip

PEERS: tuple[str, ...] = ("pymeta", "learn2learn", "higher", "torch.func", "easyfsl")


# --------------------------------------------------------------------------------------
# Smoke check (not the benchmark driver)
# --------------------------------------------------------------------------------------


def flat_grad(params: Sequence[Tensor]) -> Tensor:
    """All ``.grad`` fields concatenated (zeros where a gradient is missing)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


def _check_gradients(
    workload: str, builder: Callable[..., MetaStep], peers: Sequence[str], tol: float
) -> None:
    """Print each peer's meta-gradient difference to the first peer that runs.

    A ``peer`` may be ``"pymeta[vmap]"`` / ``"pymeta[loop]"`` (:func:`parse_peer`).
    """
    ref_name, ref = None, None
    for peer in peers:
        try:
            base, extra = parse_peer(peer)
            ms = builder(base, **extra)
        except PeerUnavailable as exc:
            print(f"  {workload:26s} {peer:12s} skipped: {exc.reason}")
            continue
        ms.step()
        g = flat_grad(ms.params)
        if ref is None:
            ref_name, ref = peer, g
            print(f"  {workload:26s} {peer:12s} reference, |g|max = {g.abs().max():.4e}")
            continue
        err = (g - ref).abs().max().item()
        rel = err / ref.abs().max().item()
        flag = "ok" if rel <= tol else "DIFFERS"
        print(
            f"  {workload:26s} {peer:12s} vs {ref_name}: max abs {err:.3e}, "
            f"rel {rel:.3e}  [{flag} @ {tol:g}]"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Smoke check: peers' meta-gradients agree, every meta-step runs, one timing each.

    Not the benchmark driver (``bench_meta.py``): one peer at a time, no CSV.
    """
    import argparse
    import platform

    from torch.utils.benchmark import Timer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, 2 "
        "threads get oversubscribed and time 5-10x worse)",
    )
    parser.add_argument(
        "--min-run-time", type=float, default=0.5, help="seconds per Timer.blocked_autorange"
    )
    parser.add_argument(
        "--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS), metavar="NAME"
    )
    parser.add_argument("--no-grad-check", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(argv)  # fmt: skip
    torch.set_num_threads(args.threads)

    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for lib in ("pymeta", "learn2learn", "higher", "easyfsl"):
        try:
            mod = _import_peer(lib, lib)
            print(f"  {lib} {getattr(mod, '__version__', '(no __version__)')}")
        except PeerUnavailable as exc:
            print(f"  {lib}: unavailable ({exc.reason})")

    if not args.no_grad_check:
        print("\nmeta-gradient agreement (float32 unless noted; rel = max abs / max |ref|):")
        checks: list[tuple[str, Callable[..., MetaStep], float]] = [
            ("sinusoid-maml-1step", lambda p, **kw: sinusoid_maml(p, 1, **kw), 1e-5),
            ("sinusoid-maml-5step", lambda p, **kw: sinusoid_maml(p, 5, **kw), 1e-4),
            ("sinusoid-metasgd-1step", lambda p, **kw: sinusoid_metasgd(p, 1, **kw), 1e-5),
            ("sinusoid-metasgd-5step", lambda p, **kw: sinusoid_metasgd(p, 5, **kw), 1e-4),
            ("conv4-maml-1st", lambda p, **kw: conv4_maml(p, True, **kw), 1e-4),
            # torch.func is expected to DIFFER here (vmap + BatchNorm, functorch issue 534).
            ("conv4-maml-2nd f64",
             lambda p, **kw: conv4_maml(p, False, dtype=torch.float64, **kw), 1e-10),
        ]  # fmt: skip
        # learn2learn first: it is the reference; pymeta with each concrete strategy.
        peers = ("learn2learn", "higher", "torch.func", "pymeta[vmap]", "pymeta[loop]")
        for name, builder, tol in checks:
            _check_gradients(name, builder, peers, tol)

    if args.no_timing:
        return
    print(f"\none meta-step per peer (Timer.blocked_autorange median, "
          f"{torch.get_num_threads()} thread(s)):")  # fmt: skip
    header = f"  {'workload':26s} {'peer':12s} {'ms':>9s} {'aten ops':>9s} {'non-view':>9s} "
    print(header + f"{'MFLOP':>9s} {'peak MiB':>9s}")
    for name in args.workloads:
        w = WORKLOADS[name]
        for peer in w.peers:
            try:
                ms = w.build(peer)
            except PeerUnavailable as exc:
                print(f"  {w.name:26s} {peer:12s} skipped: {exc.reason}")
                continue
            ms.step()  # warm-up
            timer = Timer("step()", globals={"step": ms.step}, num_threads=args.threads)
            median = timer.blocked_autorange(min_run_time=args.min_run_time).median
            ops = count_aten_ops(ms.step)
            print(
                f"  {w.name:26s} {peer:12s} {median * 1e3:9.2f} {ops.total:9d} "
                f"{ops.non_view:9d} {flops(ms.step) / 1e6:9.1f} "
                f"{peak_memory(ms.step) / 2**20:9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
