"""Shared test setup.

TRITON_INTERPRET must be set before Triton (or pymeta.kernels) is first imported, so it
is the very first thing here: the Triton kernels then run on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import numpy as np
import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker takes its share of the cores as torch threads: two
    workers of two OpenMP threads each on two cores stall each other (a conv4 meta-step
    measured ~50x slower than with one thread each)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``gpu`` where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs the gpu tests on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed every RNG before each test so failures reproduce."""
    value = 1234
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


def report(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Print max/mean absolute and max relative error before a test asserts on them."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    scale = expected.detach().double().abs().max().clamp_min(1e-300)
    print(
        f"{name}: max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}, "
        f"max rel err {(diff.max() / scale).item():.3e}"
    )
