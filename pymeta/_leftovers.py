"""Files that a killed process leaves behind, and when they are safe to remove.

A process that dies by ``kill -9``, an OOM kill or a crash cannot clean up its
temporary checkpoint file or launch folder. pymeta names such files after their owner
(:func:`owner_tag`: ``<pid>@<host>``) so that a later run can tell a leftover of a dead
process (:func:`owner_gone`) from the working file of a run that is still going, and
removes only the former.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

TAG_PATTERN = r"\d+@[A-Za-z0-9-]+"  # an owner_tag, for the patterns of leftover names
_TAG = re.compile(r"(\d+)@([A-Za-z0-9-]+)")


def _host() -> str:
    # Only characters that cannot be confused with the separators of a file name.
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def owner_tag() -> str:
    """``<pid>@<host>`` of this process, for the names of files it may leave behind."""
    return f"{os.getpid()}@{_host()}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (True when that cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def owner_gone(tag: str) -> bool:
    """True when ``tag`` is an :func:`owner_tag` of this host whose process is gone.

    A tag of another host (a shared file system) or no tag proves nothing: False.
    """
    match = _TAG.fullmatch(tag)
    return bool(match) and match.group(2) == _host() and not pid_alive(int(match.group(1)))


def age(path: Path) -> float:
    """Seconds since ``path`` was last modified."""
    return time.time() - path.stat().st_mtime


def remove_stale_folders(root: Path, prefix: str) -> list[Path]:
    """Remove the folders ``root/<prefix><owner_tag>-<anything>`` whose owner is gone; return them."""
    removed = []
    for folder in root.glob(f"{prefix}*"):
        tag = folder.name[len(prefix):].rsplit("-", 1)[0]
        if folder.is_dir() and owner_gone(tag):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
