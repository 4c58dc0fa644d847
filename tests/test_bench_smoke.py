"""Smoke run of the end-to-end benchmark driver (``pymeta bench meta``), not a timing test.

Runs ``benchmarks/bench_meta.py`` through the ``pymeta`` command with this Python, in
``--quick`` mode on the sinusoid MAML workload with 4 tasks. The peer libraries live in
their own venv (benchmarks/README.md), so here they must be reported as skipped -- never
with a number -- while pymeta and the torch.func peer run. About 8 s of CPU time (most of
it importing torch twice and pymeta's strategy warm-up); wall time grows with machine load.
Also: ``--device cuda`` without a GPU fails with a clear error,
``measure.count_kernel_launches`` returns None on CPU (no kernels to count), and the GPU
check's dry run (``pymeta bench gpu --dry-run``) finds everything it would run importable
and lists its steps within the 8-minute budget. The metric-learner workloads (e)
RelationNet and (f) MatchingNet are built in-process with 2 tasks: pymeta's meta-step
gives every parameter a gradient (no peers needed), and where easyfsl is installed its
per-task meta-gradient equals pymeta's (~1 s each).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "benchmarks" / "bench_meta.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(not DRIVER.is_file(), reason="needs the benchmarks/ folder of a checkout")
def test_bench_meta_quick_reports_skipped_peers(tmp_path: Path) -> None:
    env = {**os.environ, "PYMETA_NO_BUILD": "1"}  # the driver, not the C++ build, is under test
    cmd = [sys.executable, "-m", "pymeta", "bench", "meta", "--quick", "--workloads", "sinusoid-maml-1step",
           "--libraries", "pymeta", "learn2learn", "higher", "torch.func", "--tasks", "4",
           "--out-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    # The table comes last; every library of the workload has a row.
    table = out[out.rindex("meta-step per library") :]
    rows = {line.split()[1]: line for line in table.splitlines() if line.startswith("sinusoid")}
    assert set(rows) == {"pymeta", "learn2learn", "higher", "torch.func"}
    with open(tmp_path / "meta.csv", newline="") as f:
        csv_rows = {r["library"]: r for r in csv.DictReader(f)}
    assert set(csv_rows) == set(rows)

    for peer in ("learn2learn", "higher"):
        try:
            __import__(peer)
        except ImportError:  # the usual case: peers are not installed in this Python
            assert "skipped: cannot import" in rows[peer]
            assert csv_rows[peer]["status"].startswith("skipped:")
            assert csv_rows[peer]["tasks_per_s"] == ""  # no number for a skipped peer

    for lib in ("pymeta", "torch.func"):
        assert csv_rows[lib]["status"] == "ok"
        assert float(csv_rows[lib]["tasks_per_s"]) > 0
        assert int(csv_rows[lib]["aten_ops"]) > 0
        assert csv_rows[lib]["tasks"] == "4"
    assert csv_rows["pymeta"]["strategy"] in ("lowered", "vmap", "loop")
    # Checked against learn2learn's meta-gradient, or without it against torch.func's.
    assert csv_rows["pymeta"]["grad_check"].endswith(" ok")
    assert "pymeta strategy chosen ('auto'): sinusoid-maml-1step:" in out
    assert "targets (measured vs goal):" in out and "(a) sinusoid-maml-1step:" in out
    assert (tmp_path / "meta.png").stat().st_size > 0


@pytest.mark.skipif(not DRIVER.is_file(), reason="needs the benchmarks/ folder of a checkout")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_bench_meta_device_cuda_without_gpu_is_a_clear_error() -> None:
    # Exits in argument parsing, before any measurement: ~2 s (importing torch).
    cmd = [sys.executable, str(DRIVER), "--device", "cuda", "--quick"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "--device cuda: no CUDA device visible to torch" in result.stderr


@pytest.mark.skipif(not DRIVER.is_file(), reason="needs the benchmarks/ folder of a checkout")
def test_count_kernel_launches_is_none_on_cpu() -> None:
    spec = importlib.util.spec_from_file_location(
        "_pymeta_bench_measure", ROOT / "benchmarks" / "measure.py"
    )
    assert spec is not None and spec.loader is not None
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    x = torch.ones(3, requires_grad=True)

    def step() -> None:
        (x * x).sum().backward()

    assert measure.count_kernel_launches(step, "cpu") is None
    if not torch.cuda.is_available():
        assert measure.count_kernel_launches(step) is None
        assert measure.count_kernel_launches(step, "cuda") is None


@pytest.mark.skipif(not GPU_CHECK.is_file(), reason="needs the benchmarks/ folder of a checkout")
def test_gpu_check_dry_run_imports_everything_and_lists_the_steps(tmp_path: Path) -> None:
    # ~15 s of CPU (torch imported twice, pytest collecting the gpu tests).
    cmd = [sys.executable, "-m", "pymeta", "bench", "gpu", "--dry-run", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    out = result.stdout
    budgets = dict(re.findall(r"^  (\S+) +(\d+) s  ", out, re.MULTILINE))
    assert list(budgets) == ["build", "env", "tests", "bench-ops", "meta-a", "meta-b", "meta-c", "meta-d"]
    total = int(re.search(r"at most (\d+) s", out).group(1))
    assert total <= 480 and total >= sum(map(int, budgets.values()))
    for script in ("bench_inner_sgd.py", "bench_proto.py", "bench_max_pool2d.py", "bench_meta.py"):
        assert f"{script}: imports" in out
    collected = re.search(r"pytest -m gpu collects: (\d+)/\d+ tests collected", out)
    assert collected and int(collected.group(1)) > 0
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.skipif(not GPU_CHECK.is_file(), reason="needs the benchmarks/ folder of a checkout")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_gpu_check_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert result.returncode == 2
    assert "no CUDA device visible to torch" in result.stderr and "--dry-run" in result.stderr


@pytest.fixture
def bench() -> Iterator[SimpleNamespace]:
    """The benchmark's ``workloads`` and ``peers`` modules, imported as ``bench_meta.py``
    imports them (its folder on ``sys.path``) and dropped from ``sys.modules`` afterwards."""
    if not DRIVER.is_file():
        pytest.skip("needs the benchmarks/ folder of a checkout")
    before = set(sys.modules)
    sys.path.insert(0, str(DRIVER.parent))
    try:
        yield SimpleNamespace(workloads=importlib.import_module("workloads"), peers=importlib.import_module("peers"))
    finally:
        sys.path.remove(str(DRIVER.parent))
        for name in set(sys.modules) - before:
            if name in ("workloads", "peers") or name.startswith("peers."):
                del sys.modules[name]


METRIC_WORKLOADS = {"conv4-relationnet": ("e", (64, 7, 7)), "conv4-matchingnet": ("f", (64,))}


@pytest.mark.parametrize("name", METRIC_WORKLOADS)
def test_metric_workload_builds_and_pymeta_steps(bench: SimpleNamespace, name: str) -> None:
    group, features = METRIC_WORKLOADS[name]
    workload = bench.workloads.WORKLOADS[name]
    assert workload.group == group and bench.workloads.GROUPS[group] == (name,)
    assert workload.baseline == "easyfsl" and workload.libraries == ("pymeta", "easyfsl")
    assert workload.problem().data.num_tasks == 16
    problem = workload.problem(tasks=2)
    assert problem.algorithm == workload.algorithm and problem.n_way == 5 and problem.feature_dim == 64
    sx = problem.data.support_x
    assert tuple(sx.shape) == (2, 5, 1, 28, 28) and tuple(problem.data.query_x.shape) == (2, 75, 1, 28, 28)
    with torch.no_grad():
        assert tuple(problem.model["encoder"](sx[0]).shape) == (5, *features)

    meta = bench.peers.build("pymeta[loop]", problem, **workload.pymeta_options)
    assert meta.params == list(problem.model.parameters())  # the modules easyfsl gets too
    meta.step()
    for (param_name, _), p in zip(problem.model.named_parameters(), meta.params, strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
    assert meta.gradient().abs().max() > 0


@pytest.mark.parametrize("name", METRIC_WORKLOADS)
def test_metric_workload_meta_gradient_equals_easyfsls(bench: SimpleNamespace, name: str) -> None:
    workload = bench.workloads.WORKLOADS[name]
    try:
        theirs = bench.peers.build("easyfsl", workload.problem(tasks=2))
    except bench.peers.PeerUnavailable as exc:
        pytest.skip(f"easyfsl is not usable here ({exc.reason}); see benchmarks/README.md for the peers venv")
    ours = bench.peers.build("pymeta[loop]", workload.problem(tasks=2), **workload.pymeta_options)
    ours.step()
    theirs.step()
    ref = theirs.gradient()
    rel = ((ours.gradient() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= workload.grad_tol, f"{name}: pymeta vs easyfsl meta-gradient rel {rel:.2e}"
