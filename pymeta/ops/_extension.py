"""JIT build of pymeta's C++ (CPU) and CUDA extensions from ``csrc/``.

The sources ship as package data (``pymeta._csrc``) and are compiled on first use by
``torch.utils.cpp_extension.load`` with ninja; torch caches the build (keyed by a hash
of the sources and flags) under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). Each ``.cpp`` / ``.cu`` file registers its ops with
``TORCH_LIBRARY_FRAGMENT(pymeta_cpu, ...)`` / ``(pymeta_cuda, ...)``, so loading the
library is all it takes to make ``torch.ops.pymeta_cpu.<op>`` callable.

A build that fails (no compiler, no CUDA toolkit, no GPU) never raises at import: the
loader remembers the reason, warns once, and the ops fall back to the reference.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import warnings
from pathlib import Path

import torch

CPU_LIBRARY = "pymeta_cpu"
CUDA_LIBRARY = "pymeta_cuda"


def source_dir() -> Path:
    """Folder holding the C++/CUDA sources (``csrc/`` in a checkout, ``pymeta/_csrc`` in a wheel)."""
    return Path(str(importlib.resources.files("pymeta._csrc")))


def _sources(suffix: str) -> list[str]:
    return sorted(str(p) for p in source_dir().glob(f"*{suffix}"))


def _build(name: str, sources: list[str], cuda: bool, verbose: bool) -> None:
    from torch.utils.cpp_extension import load

    # No -std flag: torch chooses the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
    cflags = ["-O3", "-fopenmp"]
    load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "--use_fast_math"] if cuda else None,
        extra_include_paths=[str(source_dir())],
        is_python_module=False,
        verbose=verbose,
    )


@functools.cache
def _load_cpu(verbose: bool = False) -> str | None:
    """Build and load the CPU extension; return None on success, else why it failed."""
    sources = _sources(".cpp")
    if not sources:
        return "no C++ sources found in pymeta._csrc"
    try:
        _build(CPU_LIBRARY, sources, cuda=False, verbose=verbose)
    except Exception as exc:  # compiler missing, ninja missing, compile error ...
        reason = f"C++ extension failed to build: {type(exc).__name__}: {str(exc)[-400:]}"
        warnings.warn(f"pymeta: {reason}; falling back to the PyTorch reference", stacklevel=3)
        return reason
    return None


@functools.cache
def _load_cuda(verbose: bool = False) -> str | None:
    """Build and load the CUDA extension; return None on success, else why it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "CUDA toolkit (nvcc) not found: set CUDA_HOME"
    sources = _sources(".cu")
    if not sources:
        return "no CUDA sources found in pymeta._csrc"
    try:
        _build(CUDA_LIBRARY, sources, cuda=True, verbose=verbose)
    except Exception as exc:
        reason = f"CUDA extension failed to build: {type(exc).__name__}: {str(exc)[-400:]}"
        warnings.warn(f"pymeta: {reason}; falling back", stacklevel=3)
        return reason
    return None


def cpu_unavailable_reason() -> str | None:
    """None when the C++ CPU extension is loaded (building it on first call), else the reason."""
    if os.environ.get("PYMETA_NO_BUILD") == "1":
        return "building disabled by PYMETA_NO_BUILD=1"
    return _load_cpu()


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA extension is loaded (building it on first call), else the reason."""
    if os.environ.get("PYMETA_NO_BUILD") == "1":
        return "building disabled by PYMETA_NO_BUILD=1"
    return _load_cuda()


def build(verbose: bool = True) -> dict[str, str | None]:
    """Build every extension that can be built here now; map name -> None or failure reason."""
    return {"cpp": _load_cpu(verbose), "cuda": _load_cuda(verbose)}
