"""Keep freed CPU memory in the process for reuse (glibc), instead of faulting it back in.

A CPU meta-step allocates and frees the same large activations over and over: one task
chunk's query activations (``[75, 64, 28, 28]``, 15 MB, in conv4 MAML) are freed at the
end of the chunk and allocated again by the next. glibc's ``malloc`` serves blocks over
its mmap threshold with fresh ``mmap`` regions and returns free memory at the top of its
heap to the OS above its trim threshold (both adapt, up to 32 MiB and 64 MiB: ``man 3
mallopt``), so each chunk pays a page fault per 4 KiB of its activations. On a 2-core
AMD EPYC VM a fault cost about 4 us (15 MB: about 14 ms, five times the convolution that
writes it): in a fresh process running conv4 2nd-order MAML steps (8 tasks, one per
chunk) a step took 0.74 s with the setting below and 0.90 s without (learn2learn's step,
also in a fresh process: 0.97 s and 1.07 s). How much it gains depends on what the
process did before: glibc raises its thresholds after large blocks are freed, and
``benchmarks/bench_meta.py``, which runs gradient checks before it times, measured no
difference. PyTorch's CPU tuning guide gives the same advice for jemalloc or
tcmalloc (https://pytorch.org/tutorials/recipes/recipes/tuning_guide.html, "Switch
Memory allocator").

:func:`keep_freed_memory` sets, once per process, on glibc only:

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's own upper bound for the adaptive value): blocks
  up to that size come from the heap, so their pages are reused;
* ``M_TRIM_THRESHOLD`` = 1 GiB: up to that much free memory stays in the heap rather than
  going back to the OS.

Trade-off: after a large step the process's resident memory stays up to 1 GiB above what
its live tensors need (as PyTorch's CUDA caching allocator keeps GPU memory). The first
learner constructed applies it; set ``PYMETA_KEEP_FREED_MEMORY=0`` before that to keep
glibc's defaults (or to use another allocator through ``LD_PRELOAD``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
ENV = "PYMETA_KEEP_FREED_MEMORY"

# None: not tried yet; else what keep_freed_memory found (True: applied, or why not).
_state: bool | str | None = None


def keep_freed_memory() -> bool | str:
    """Apply the setting of the module docstring once; ``True``, or why it was not applied."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def glibc() -> ctypes.CDLL | str:
    """This process's glibc, or why there is none to tune."""
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform})"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "gnu_get_libc_version") else "not glibc"


def _apply() -> bool | str:
    if os.environ.get(ENV, "1") == "0":
        return f"off ({ENV}=0)"
    libc = glibc()
    if isinstance(libc, str):
        return libc
    # Both, or neither: setting either one turns glibc's adaptive thresholds off, and a
    # fixed 128 KiB mmap threshold alone would fault in every large block.
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "mallopt refused the setting"
    return True
