"""The C++ extension's build cache: a killed build never makes a later load hang, a
waiting process says so, and installs of the same sources share one build.

Each test builds in its own ``TORCH_EXTENSIONS_DIR`` under ``tmp_path`` through
pymeta's real loader and torch's real JIT build (ninja and the C++ compiler).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pymeta
from pymeta.ops import _extension

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None,
    reason="building the C++ extension needs a C++ compiler and ninja",
)


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **extra}
    env.pop("PYMETA_NO_BUILD", None)
    return env


def wheel_layout(site: Path) -> Path:
    """pymeta laid out as a wheel installs it: the sources inside the package (pymeta/_csrc)."""
    package = Path(pymeta.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(package, site / "pymeta", ignore=ignore)
    shutil.copytree(_extension.source_dir(), site / "pymeta" / "_csrc", ignore=ignore)
    kernels = importlib.util.find_spec("pymeta.kernels").submodule_search_locations[0]
    shutil.copytree(kernels, site / "pymeta" / "kernels", ignore=ignore)
    return site


@pytest.mark.slow
@needs_compiler
def test_a_build_killed_by_kill_9_is_detected_and_rebuilt_and_installs_share_it(tmp_path):
    env = environment(tmp_path)
    directory = Path(env["TORCH_EXTENSIONS_DIR"]) / _extension.build_directory(_extension.CPU).name
    build = subprocess.Popen([sys.executable, "-m", "pymeta", "build-ext"], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (directory / "lock").exists() and build.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # The build is running (torch holds its lock file): kill it and its compilers, as a
    # crash, an OOM kill or a closed laptop would.
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    print(build.stderr.read())
    assert (directory / "lock").exists(), "the killed build should have left torch's lock file"
    assert not (directory / "built").exists()

    # Before the fix, every later load waited on that lock forever, silently.
    result = subprocess.run([sys.executable, "-m", "pymeta", "info"], env=env, capture_output=True, text=True,
                            timeout=900)
    print(result.stderr)
    assert result.returncode == 0
    assert f"found the stale build lock {directory / 'lock'}, left by a build that was killed" in result.stderr
    assert "pymeta: building pymeta's C++ extension (first use, ~1 min)..." in result.stderr
    assert "cpp        available" in result.stdout
    assert not (directory / "lock").exists() and (directory / "built").exists()

    # A wheel install of the same sources (elsewhere on disk) loads that build: no rebuild.
    site = wheel_layout(tmp_path / "site")
    check = "import pymeta, pymeta.ops; print(pymeta.__file__); print(pymeta.ops.backends()['cpp'])"
    result = subprocess.run([sys.executable, "-c", check], env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr)
    assert result.stdout.splitlines() == [str(site / "pymeta" / "__init__.py"), "available"]
    assert "building" not in result.stderr


HOLDER = """
import sys, time
from pathlib import Path
from pymeta.ops import _extension
with _extension._build_lock(Path(sys.argv[1]), _extension.CPU):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_process_waiting_for_another_ones_build_says_so_and_gives_up_after_the_timeout(
    tmp_path, capsys, monkeypatch
):
    if os.name == "nt":
        pytest.skip("the build lock uses flock (POSIX)")
    directory = tmp_path / "build"
    directory.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        monkeypatch.setattr(_extension, "BUILD_TIMEOUT", 1.0)
        with pytest.raises(TimeoutError, match=rf"process {holder.pid} .* has held the build lock"), \
                _extension._build_lock(directory, _extension.CPU):
            pass
        assert f"waiting for process {holder.pid}" in capsys.readouterr().err
        monkeypatch.setattr(_extension, "BUILD_TIMEOUT", 120.0)
        holder.send_signal(signal.SIGKILL)  # the OS releases its lock: the waiter goes on at once
        with _extension._build_lock(directory, _extension.CPU) as exclusive:
            assert exclusive
            assert (directory / "pymeta.lock").read_text().startswith(f"process {os.getpid()} ")
    finally:
        holder.kill()
        holder.wait()


def test_the_build_folder_is_keyed_by_the_sources_not_their_location(tmp_path):
    copy = shutil.copytree(_extension.source_dir(), tmp_path / "csrc")
    assert _extension.build_directory(_extension.CPU, copy) == _extension.build_directory(_extension.CPU)
    (copy / "inner_sgd.cpp").write_text((copy / "inner_sgd.cpp").read_text() + "\n// changed\n")
    changed = _extension.build_directory(_extension.CPU, copy)
    assert changed.parent == _extension.build_directory(_extension.CPU).parent
    assert changed != _extension.build_directory(_extension.CPU) and changed.name.startswith("pymeta_cpu-")
    assert _extension.build_directory(_extension.CUDA) != _extension.build_directory(_extension.CPU)
