"""Stopping a real `pymeta train` process: Ctrl-C (SIGINT) and kill -9 of the launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymeta import _leftovers, checkpoint, distributed

# A run far too long to finish; a checkpoint every 5 steps.
ENDLESS = ["train", "--algo", "maml", "--data", "sinusoid", "--iterations", "100000", "--meta-batch", "2",
           "--val-every", "5", "--val-episodes", "2", "--eval-episodes", "2", "--strategy", "vmap", "--no-progress"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc (Linux)")


def start(tmp_path: Path, nproc: int) -> tuple[subprocess.Popen, Path, list[int]]:
    """The run, once it has written its first checkpoint; its checkpoint and child pids."""
    out = tmp_path / "run.pt"
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "pymeta", *ENDLESS, "--nproc", str(nproc), "--out", str(out)],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "run-last.pt"
    deadline = time.time() + 300
    while not last.exists():
        assert run.poll() is None, run.communicate()
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    return run, last, [int(pid) for pid in children]


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        alive = [pid for pid in pids if _leftovers.pid_alive(pid) and not _zombie(pid)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigint_to_the_launcher_stops_the_run_with_one_line(tmp_path, nproc):
    """SIGINT to the launching process only (kill -INT, a job scheduler's stop): with
    --nproc 2 the workers used to train on to the end behind a traceback."""
    run, last, children = start(tmp_path, nproc)
    os.kill(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=120)
    print(err)
    assert run.returncode == 130
    assert "Traceback" not in err
    line = re.fullmatch(rf"pymeta train: interrupted at step (\d+); last checkpoint: {re.escape(str(last))} "
                        rf"\(step (\d+)\)", err.strip().splitlines()[-1])
    assert line, err
    step, saved = int(line.group(1)), int(line.group(2))
    assert saved % 5 == 0 and saved < step and checkpoint.load(last)["step"] == saved
    assert wait_gone(children, 10) == []
    written = last.stat().st_mtime_ns
    time.sleep(1)  # a worker still training would write a checkpoint every 5 steps
    assert last.stat().st_mtime_ns == written
    assert not list(tmp_path.glob(f"{distributed.LAUNCH_PREFIX}*"))


LAUNCHER = """
import sys, time
from pymeta import distributed
distributed.launch(time.sleep, 1, 600)  # one worker that sleeps: killing this process is the test
"""


def test_a_killed_launchers_worker_stops_and_its_folder_is_removed_at_the_next_launch(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], env={**os.environ, "TMPDIR": str(tmp_path)})
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    deadline = time.time() + 300
    while not (children.read_text().split() and list(tmp_path.glob(f"{distributed.LAUNCH_PREFIX}*"))):
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.05)
    workers = [int(pid) for pid in children.read_text().split()]
    time.sleep(1)  # the worker may be starting or sleeping: either way it must not outlive the launcher
    launcher.kill()  # kill -9: nothing of the launcher runs
    launcher.wait()
    (left,) = tmp_path.glob(f"{distributed.LAUNCH_PREFIX}*")
    assert wait_gone(workers, 30) == []  # the OS sends workers a SIGINT when it dies (PR_SET_PDEATHSIG)
    live = tmp_path / f"{distributed.LAUNCH_PREFIX}{_leftovers.owner_tag()}-abcd1234"  # a running launcher's
    live.mkdir()
    assert _leftovers.remove_stale_folders(tmp_path, distributed.LAUNCH_PREFIX) == [left]
    assert not left.exists() and live.is_dir()
