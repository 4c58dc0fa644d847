"""JIT build of pymeta's C++ (CPU) and CUDA extensions from ``csrc/``.

The sources ship as package data (``pymeta._csrc``) and are compiled on first use by
``torch.utils.cpp_extension.load`` with ninja. Each ``.cpp`` / ``.cu`` file registers
its ops with ``TORCH_LIBRARY_FRAGMENT(pymeta_cpu, ...)`` / ``(pymeta_cuda, ...)``, so
loading the library is all it takes to make ``torch.ops.pymeta_cpu.<op>`` callable.

The build cache: ``$TORCH_EXTENSIONS_DIR/pymeta_cpu-<key>`` (default root
``~/.cache/torch_extensions``), where ``<key>`` hashes the sources' contents, the
flags, and the torch and Python versions. The sources are copied into that folder and
compiled there, so an editable install and a wheel of the same sources share one build
(instead of rebuilding on every switch), and any change of sources or versions gets a
fresh folder. A finished build is loaded directly, without ninja or locks.

Building is guarded by ``pymeta.lock`` in that folder, held with ``flock``: the OS
releases it when its holder dies, however it dies. torch's own ``lock`` file, which a
build killed by ``kill -9`` (OOM, closed laptop) leaves behind and which makes every
later ``load`` wait forever, is therefore known to be stale whenever pymeta holds its
lock: it is reported and removed, and the build runs again. A process that waits for
another one's build says so, and gives up after :data:`BUILD_TIMEOUT`.

A build that fails (no compiler, no CUDA toolkit, no GPU) never raises at import: the
loader remembers the reason, warns once, and the ops fall back to the reference.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

CPU_LIBRARY = "pymeta_cpu"
CUDA_LIBRARY = "pymeta_cuda"
# No build of these sources takes this long (C++: about a minute on 2 cores): a
# process still holding the build lock after it is stuck, and nobody waits longer.
BUILD_TIMEOUT = 30 * 60.0


@dataclass(frozen=True)
class Extension:
    """One JIT-built library: its name, the source suffix it compiles, and its flags."""

    library: str
    suffix: str
    kind: str  # for messages: "C++" or "CUDA"
    duration: str  # how long a first build takes
    cuda_cflags: tuple[str, ...] | None = None
    # No -std flag: torch chooses the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
    cflags: tuple[str, ...] = ("-O3", "-fopenmp")
    ldflags: tuple[str, ...] = ("-fopenmp",)


CPU = Extension(CPU_LIBRARY, ".cpp", "C++", "~1 min")
CUDA = Extension(CUDA_LIBRARY, ".cu", "CUDA", "a few minutes", ("-O3", "--use_fast_math"))


def source_dir() -> Path:
    """Folder holding the C++/CUDA sources (``csrc/`` in a checkout, ``pymeta/_csrc`` in a wheel)."""
    return Path(str(importlib.resources.files("pymeta._csrc")))


def _source_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h"))


def build_directory(ext: Extension, sources: Path | None = None) -> Path:
    """Where ``ext`` is built from the sources in ``sources`` (default :func:`source_dir`):
    ``<extensions root>/<library>-<16 hex digits of the key>``, the same for every
    install of the same sources."""
    digest = hashlib.sha256()
    versions = (torch.__version__, torch.version.git_version, torch.version.cuda, sys.version, platform.machine(),
                os.environ.get("CXX", ""), repr(ext))
    for part in versions:
        digest.update(f"{part}\0".encode())
    for path in _source_files(sources or source_dir()):
        digest.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / f"{ext.library}-{digest.hexdigest()[:16]}"


def _say(message: str) -> None:
    """One line on stderr, above any progress bar."""
    tqdm.write(f"pymeta: {message}", file=sys.stderr)


def _load(ext: Extension, verbose: bool) -> None:
    """Load ``ext`` from its build folder, building it first if it is not built yet."""
    from torch.utils.cpp_extension import LIB_EXT

    sources = source_dir()
    units = [p.name for p in _source_files(sources) if p.suffix == ext.suffix]
    if not units:
        raise FileNotFoundError(f"no {ext.suffix} sources found in {sources}")
    directory = build_directory(ext, sources)
    library, built = directory / f"{ext.library}{LIB_EXT}", directory / "built"
    if built.is_file():
        torch.ops.load_library(str(library))
        return
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory, ext) as exclusive:
        if built.is_file():  # built meanwhile by the process this one waited for
            torch.ops.load_library(str(library))
            return
        _remove_stale_torch_lock(directory, exclusive)
        staged = _stage(sources, directory / "src")
        _say(f"building pymeta's {ext.kind} extension (first use, {ext.duration})...")
        start = time.perf_counter()
        from torch.utils.cpp_extension import load

        load(
            name=ext.library,
            sources=[str(staged / name) for name in units],
            extra_cflags=list(ext.cflags),
            extra_ldflags=list(ext.ldflags),
            extra_cuda_cflags=None if ext.cuda_cflags is None else list(ext.cuda_cflags),
            extra_include_paths=[str(staged)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
        built.write_text(f"built in {time.perf_counter() - start:.0f} s\n")
        _say(f"built in {time.perf_counter() - start:.0f} s, cached in {directory}")


def _stage(sources: Path, folder: Path) -> Path:
    """Copy the sources into the build folder (unchanged files keep their time stamps, so
    ninja reuses what an interrupted build already compiled)."""
    folder.mkdir(exist_ok=True)
    for path in _source_files(sources):
        data, copy = path.read_bytes(), folder / path.name
        if not copy.is_file() or copy.read_bytes() != data:
            copy.write_bytes(data)
    return folder


@contextlib.contextmanager
def _build_lock(directory: Path, ext: Extension) -> Iterator[bool]:
    """Hold ``directory/pymeta.lock`` for the block; yield whether the lock is exclusive
    (False where ``fcntl`` does not exist, i.e. on Windows: torch's lock file alone)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(directory / "pymeta.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            _say(f"waiting for {owner}, which is building pymeta's {ext.kind} extension in {directory}")
            deadline = os.stat(f.fileno()).st_mtime + BUILD_TIMEOUT
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.time() > deadline:
                        raise TimeoutError(
                            f"{owner} has held the build lock {directory / 'pymeta.lock'} for over "
                            f"{BUILD_TIMEOUT / 60:.0f} min; stop it, or delete {directory}"
                        ) from None
                    time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        yield True


def _remove_stale_torch_lock(directory: Path, exclusive: bool) -> None:
    """Remove torch's ``lock`` file if no live build can own it: always while pymeta's
    lock is held exclusively (every build here runs under it), else once it is older
    than any build takes."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if exclusive or age > BUILD_TIMEOUT:
        _say(f"found the stale build lock {lock}, left by a build that was killed or crashed (its process "
             "is gone); removing it and building again")
        lock.unlink(missing_ok=True)


def _unavailable(ext: Extension, verbose: bool) -> str | None:
    """Load ``ext`` (building it if needed); None on success, else why it failed."""
    try:
        _load(ext, verbose)
    except Exception as exc:  # compiler missing, ninja missing, compile error ...
        reason = f"{ext.kind} extension failed to build: {type(exc).__name__}: {str(exc)[-400:]}"
        warnings.warn(f"pymeta: {reason}; falling back to the PyTorch reference", stacklevel=4)
        return reason
    return None


@functools.cache
def _load_cpu(verbose: bool = False) -> str | None:
    """Build and load the CPU extension; return None on success, else why it failed."""
    return _unavailable(CPU, verbose)


@functools.cache
def _load_cuda(verbose: bool = False) -> str | None:
    """Build and load the CUDA extension; return None on success, else why it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "CUDA toolkit (nvcc) not found: set CUDA_HOME"
    return _unavailable(CUDA, verbose)


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
