"""Backend selection for pymeta's fused ops.

Per call, for the device of the inputs:

* CUDA tensors: ``triton`` when Triton works, else the ``cuda`` extension, else ``reference``.
* CPU tensors: the ``cpp`` extension when it built, else ``reference``. Triton runs on CPU
  tensors only when forced and ``TRITON_INTERPRET=1`` (how the tests exercise it).

An op may pass over a backend for particular inputs and say why (e.g. max-pool planes
narrower than 16 columns are faster through ATen than through the C++ kernel).

``PYMETA_BACKEND=reference|cpp|cuda|triton`` (or the :func:`force_backend` context
manager) forces one; a forced backend that cannot run raises with the reason instead of
silently running something else (an op with no kernel for it runs its reference).
:func:`usage` tells which backend each op ran on in this process, and why.

While a CUDA graph is being captured (:class:`pymeta.CUDAGraphStep`), an op whose GPU
kernels cannot be captured runs on the reference instead (see :func:`choose`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pymeta.ops import _extension

BACKENDS = ("reference", "cpp", "cuda", "triton")
_forced: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`force_backend` or ``PYMETA_BACKEND``, if any."""
    if _forced is not None:
        return _forced
    env = os.environ.get("PYMETA_BACKEND")
    return _check_name(env, "PYMETA_BACKEND") if env else None


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Run every pymeta op inside the block on backend ``name`` (None: automatic choice)."""
    global _forced
    previous = _forced
    _forced = None if name is None else _check_name(name, "backend")
    try:
        yield
    finally:
        _forced = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401

        import pymeta.kernels  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable: {type(exc).__name__}: {exc}"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ops on tensors of ``device``, else a one-line reason."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, not {device.type}"
        return _extension.cpu_unavailable_reason()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device.type}"
        return _extension.cuda_unavailable_reason()
    if backend == "triton":
        reason = _triton_import_error()
        if reason is not None:
            return reason
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device visible to torch"
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


Reason = Callable[[str], "str | None"]
_PREFERRED = {"cpu": "preferred for cpu tensors", "cuda": "preferred for cuda tensors"}


def choose(
    device: torch.device,
    kernels: tuple[str, ...] = BACKENDS[1:],
    not_supported: Reason | None = None,
    slower: Reason | None = None,
    uncapturable: str | None = None,
) -> tuple[str, str]:
    """``(backend, why)``: the backend an op with ``kernels`` runs on for given inputs on ``device``.

    ``not_supported(backend)``: why that backend's kernel cannot take these inputs (a forced
    backend then raises with it); ``slower(backend)``: why the automatic choice passes it over
    for these inputs although it could run them (a forced backend runs anyway).
    ``uncapturable``: why the op's GPU kernels cannot be captured in a CUDA graph, if they
    cannot; during a capture such an op runs on the reference (whose torch ops can be
    captured), and forcing a GPU backend for it raises with that reason.
    """
    forced = forced_backend()
    no_gpu_kernels = uncapturable is not None and device.type == "cuda" and capturing()
    if forced is not None:
        if forced not in ("reference", *kernels):
            return "reference", f"{forced} forced, but this op has no {forced} kernel"
        reason = unavailable_reason(forced, device)
        if reason is None and no_gpu_kernels and forced in ("cuda", "triton"):
            reason = f"a CUDA graph is being captured and {uncapturable}"
        if reason is None and forced != "reference" and not_supported is not None:
            reason = not_supported(forced)
        if reason is not None:
            raise RuntimeError(f"pymeta backend {forced!r} was forced but cannot run here: {reason}")
        return forced, "forced (PYMETA_BACKEND or force_backend)"
    if no_gpu_kernels:
        return "reference", f"a CUDA graph is being captured and {uncapturable}"
    if not kernels:
        return "reference", "the op has no kernels: its reference is its implementation"
    skipped = []
    for backend in ("triton", "cuda") if device.type == "cuda" else ("cpp",):
        if backend not in kernels:
            skipped.append(f"{backend}: this op has no {backend} kernel")
            continue
        reason = unavailable_reason(backend, device)
        for hook in (not_supported, slower):
            if reason is None and hook is not None:
                reason = hook(backend)
        if reason is None:
            return backend, "; ".join(skipped) if skipped else _PREFERRED.get(device.type, "preferred")
        skipped.append(f"{backend}: {reason}")
    return "reference", "; ".join(skipped) if skipped else f"no kernel runs on {device.type} tensors"


def run(backend: str, op: str, args: tuple[Any, ...]) -> Any:
    """Run kernel ``op`` (e.g. ``"proto_logits_backward"``) on ``backend`` (``cpp``, ``cuda`` or ``triton``).

    ``cpp`` / ``cuda``: ``torch.ops.pymeta_cpu.<op>`` / ``torch.ops.pymeta_cuda.<op>``;
    ``triton``: ``forward`` (or ``backward`` for a ``*_backward`` op) of the Triton module
    ``pymeta.kernels.<op without _backward>``, imported on first use (importing Triton is
    slow and needs a working install); all three take ``args``.
    """
    if backend == "cpp":
        return getattr(torch.ops.pymeta_cpu, op)(*args)
    if backend == "cuda":
        return getattr(torch.ops.pymeta_cuda, op)(*args)
    kernels = importlib.import_module(f"pymeta.kernels.{op.removesuffix('_backward')}")
    return getattr(kernels, "backward" if op.endswith("_backward") else "forward")(*args)


# Which backend each op ran on and why, counted per process: see usage().
_usage: Counter[tuple[str, str, str]] = Counter()


def record(op: str, backend: str, reason: str) -> None:
    """Count one call of ``op`` on ``backend`` for ``reason`` (what :func:`usage` reports)."""
    _usage[op, backend, reason] += 1


def usage() -> list[tuple[str, str, str, int]]:
    """``(op, backend, why, calls)`` for every op call of this process since :func:`reset_usage`.

    Under ``torch.compile`` a call counts when the compiled code runs an op's kernel; a
    call that skips the op (small CPU ``inner_sgd``) is traced into the graph and not counted.
    """
    return [(op, backend, reason, n) for (op, backend, reason), n in sorted(_usage.items())]


def reset_usage() -> None:
    """Forget the calls counted so far (see :func:`usage`)."""
    _usage.clear()


def backends() -> dict[str, str]:
    """Every backend with ``"available"`` or the reason it cannot run on this machine.

    CPU-only backends are judged on CPU tensors, GPU backends on CUDA tensors (Triton
    also counts as available on CPU when ``TRITON_INTERPRET=1``).
    """
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    report = {}
    for name in BACKENDS:
        if name == "triton" and triton_interpreting():
            reason = unavailable_reason(name, cpu)
        else:
            reason = unavailable_reason(name, cpu if name in ("reference", "cpp") else cuda)
        report[name] = "available" if reason is None else reason
    return report
