"""Each library's implementation of the workloads, one module per library.

``build(library, problem)`` returns a :class:`MetaStep`: ``step()`` runs one full
meta-step -- the inner loop over all tasks, the query loss and its ``backward()`` -- but
*not* the outer optimizer step; afterwards ``params`` hold in ``.grad`` the meta-gradient
of the mean query loss over tasks (gradients are reset to ``None`` at the start of every
call). Libraries (modules beside this file), written the way their users write them:

* ``learn2learn`` -- ``MAML`` / ``MetaSGD``, ``clone()`` + ``adapt()`` per task.
* ``higher`` -- ``innerloop_ctx`` per task.
* ``torch_func`` (library name ``"torch.func"``) -- hand-written ``vmap`` over tasks of a
  ``torch.func.grad`` inner loop.
* ``easyfsl`` -- ``PrototypicalNetworks``, one task at a time.
* ``pymeta`` -- this library, one batched ``episode`` over all tasks.

A library name may carry options in brackets (:func:`parse_library`): every library takes
``compile=1`` (its meta-loss function wrapped in ``torch.compile``, see
:func:`meta_step`); pymeta also takes its own (``"pymeta[loop,task_chunk=4]"``).

Libraries (pymeta too) are imported lazily, when a meta-step is built; a missing or broken
one raises :class:`PeerUnavailable`, so a driver reports ``skipped: <reason>`` and never
fakes a number. This package itself needs only ``torch`` and pymeta's ``Episode`` type.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from workloads import Problem

from pymeta.data import Episode

# Library name -> module in this package.
MODULES = {"pymeta": "pymeta", "learn2learn": "learn2learn", "higher": "higher",
           "torch.func": "torch_func", "easyfsl": "easyfsl"}  # fmt: skip
LIBRARIES = tuple(MODULES)


class PeerUnavailable(RuntimeError):
    """A library cannot run here (not installed, fails to import, or unsupported)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class MetaStep:
    """One library's meta-step: ``step()`` runs it, ``params`` receive the meta-gradients.

    ``strategy`` (pymeta only) returns the execution strategy in use: ``None`` while
    ``"auto"`` is still measuring its candidates, then the one it chose. ``compiled``:
    the meta-loss function runs under ``torch.compile`` (the first call compiles).
    """

    step: Callable[[], None]
    params: list[Tensor]
    strategy: Callable[[], str | None] | None = None
    compiled: bool = False

    def gradient(self) -> Tensor:
        """All ``.grad`` fields concatenated (zeros where a gradient is missing)."""
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in self.params])


def import_peer(name: str, module: str) -> Any:
    """Import a library lazily; raise :class:`PeerUnavailable` if it cannot be used."""
    try:
        # learn2learn imports gym, which prints an "unmaintained" notice to stderr.
        with contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        raise PeerUnavailable(name, f"cannot import {module}: {type(exc).__name__}: {exc}") from exc


def parse_library(name: str) -> tuple[str, dict[str, Any]]:
    """Split a library name with options: ``"pymeta[loop]"`` -> ``("pymeta", {"strategy":
    "loop"})``, ``"torch.func[compile=1]"`` -> ``("torch.func", {"compile": 1})``; a bare
    word is pymeta's strategy, ``key=value`` an integer option. Plain names -> ``(name, {})``."""
    if not (name.endswith("]") and "[" in name):
        return name, {}
    base, inside = name[:-1].split("[", 1)
    options: dict[str, Any] = {}
    for item in filter(None, inside.split(",")):
        key, sep, value = item.partition("=")
        options.update({key: int(value)} if sep else {"strategy": item})
    return base, options


def supports(library: str, algorithm: str) -> bool:
    """Whether ``library`` (options allowed) has an implementation of ``algorithm``."""
    base = parse_library(library)[0]
    return base in MODULES and hasattr(importlib.import_module(f"peers.{MODULES[base]}"), algorithm)


def build(library: str, problem: Problem, **defaults: Any) -> MetaStep:
    """``library``'s meta-step on ``problem``; ``defaults`` are pymeta's options of the
    workload, overridden by those in the name. Raises :class:`PeerUnavailable`."""
    base, options = parse_library(library)
    if not supports(library, problem.algorithm):
        raise PeerUnavailable(library, f"no {library!r} implementation of {problem.algorithm!r}")
    if base == "pymeta":
        options = {**defaults, **options}
    elif set(options) - {"compile"}:
        raise PeerUnavailable(library, f"{base} takes only [compile=1], got {sorted(options)}")
    module = importlib.import_module(f"peers.{MODULES[base]}")
    return getattr(module, problem.algorithm)(problem, **options)


def protonet_logits(library: str, problem: Problem) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``logits(support_x, support_y, query_x) -> [T, Q, N]`` of ``library``'s ProtoNet
    (negative plain Euclidean distances of each query to its task's class means)."""
    if not supports(library, "protonet_logits"):
        raise PeerUnavailable(library, "no ProtoNet logits")
    module = importlib.import_module(f"peers.{MODULES[parse_library(library)[0]]}")
    return module.protonet_logits(problem)


def zero_grads(params: Sequence[Tensor]) -> None:
    """Drop accumulated gradients (no ATen op is dispatched for this)."""
    for p in params:
        p.grad = None


def compile_cold(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile(fn)`` with Inductor's and AOTAutograd's on-disk caches off, so the
    first call compiles from scratch (the cold compile time a new user sees), and with
    the recompile limit a hard error: a compiled variant must never fall back to eager
    silently and be timed as compiled.

    Inductor also keeps the C++ it compiled (a code cache, not switched off by
    ``fx_graph_cache``) in ``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``:
    a run that found its kernels there skipped their g++ builds (86 s of a conv4 MAML
    compile). Each benchmark process compiles into a new empty folder instead (removed at
    exit), shared by the compiled variants it runs."""
    import atexit
    import shutil
    import tempfile

    import torch._dynamo.config
    import torch._functorch.config
    import torch._inductor.config

    if "PYMETA_BENCH_INDUCTOR_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="pymeta-bench-inductor-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["PYMETA_BENCH_INDUCTOR_DIR"] = os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn)


def meta_step(
    params: list[Tensor],
    loss: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    data: Episode,
    *,
    per_task: bool,
    compile: int = 0,
    strategy: Callable[[], str | None] | None = None,
) -> MetaStep:
    """The meta-step of a library whose meta-loss function is ``loss(sx, sy, qx, qy)``.

    ``per_task``: ``loss`` takes one task's ``[S, ...]`` / ``[Q, ...]`` tensors and the
    step runs ``(loss(task) / T).backward()`` task by task (learn2learn's, higher's and
    easyfsl's examples; peak memory is one task's graph); else ``loss`` takes the whole
    ``[T, ...]`` meta-batch and returns the mean over tasks, and the step runs one
    ``backward()``. ``compile``: ``loss`` runs under ``torch.compile`` (tensors of equal
    shapes each call, so one compilation serves every task and step).
    """
    fn = compile_cold(loss) if compile else loss
    sx, sy, qx, qy = data
    num_tasks = data.num_tasks

    def step() -> None:
        zero_grads(params)
        if not per_task:
            fn(sx, sy, qx, qy).backward()
            return
        for t in range(num_tasks):
            (fn(sx[t], sy[t], qx[t], qy[t]) / num_tasks).backward()

    return MetaStep(step, params, strategy, compiled=bool(compile))
