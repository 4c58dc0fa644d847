"""pymeta._malloc: once a learner exists, freed CPU memory is reused instead of faulting
fresh pages in. Each case runs in a new process (the setting is per process)."""

import os
import subprocess
import sys

import pytest

from pymeta import _malloc

# Page faults per meta-step of a small conv4 MAML, one task per chunk (each chunk frees
# its activations and the next allocates them again, as in bench_meta.py's conv4
# workloads). How often glibc's adaptive thresholds return them to the OS varies from
# machine to machine (1,500-13,000 faults a step seen), so both runs start from glibc's
# initial, fixed thresholds (128 KiB, set through GLIBC_TUNABLES: every activation is
# then a fresh mmap, 40,000 faults a step seen) and differ only in the setting, which
# must override them (170-370 faults seen: what else fragments the heap).
GLIBC_INITIAL_THRESHOLDS = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"
SCRIPT = """
import resource, torch
import pymeta
from pymeta.models import conv4
torch.set_num_threads(1)
torch.manual_seed(0)
maml = pymeta.MAML(conv4(1, 5, hidden=32), lr=0.1, task_chunk=1)
sx, sy = torch.randn(3, 5, 1, 28, 28), torch.arange(5).repeat(3, 1)
qx, qy = torch.randn(3, 40, 1, 28, 28), torch.arange(5).repeat(3, 8)
def step():
    maml.meta_loss(sx, sy, qx, qy).backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""

glibc = pytest.mark.skipif(isinstance(_malloc.glibc(), str), reason=f"glibc only: {_malloc.glibc()}")


def faults_per_step(setting: str) -> float:
    env = {**os.environ, _malloc.ENV: setting, "GLIBC_TUNABLES": GLIBC_INITIAL_THRESHOLDS}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@glibc
def test_a_learner_reuses_freed_activations_instead_of_faulting_them_in():
    kept, default = faults_per_step("1"), faults_per_step("0")
    assert default > 3000, f"glibc's 128 KiB thresholds should fault the activations back in: {default} faults a step"
    assert kept < 1000, f"freed activations should be reused: {kept} faults a step"


def test_opt_out_reports_why(monkeypatch):
    monkeypatch.setattr(_malloc, "_state", None)
    monkeypatch.setenv(_malloc.ENV, "0")
    assert _malloc.keep_freed_memory() == f"off ({_malloc.ENV}=0)"
