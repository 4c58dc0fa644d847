"""Checkpoints: verified on load, never executed, and no temp files left behind by a killed writer."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from pymeta import _leftovers, checkpoint, cli


def test_a_flipped_bit_in_tensor_data_is_caught_by_the_checksum(tmp_path, capsys):
    path = tmp_path / "ck.pt"
    checkpoint.save(path, {"model": {"w": torch.full((64,), 1.25)}, "step": 3})
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.full((64,), 1.25))
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<f", 1.25) * 64) + 4 * 10 + 3  # the exponent byte of w[10]
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    # What the checksum guards against: PyTorch reads the damaged file without complaint.
    torch.load(path, weights_only=True)
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {path} is corrupt: its contents do not match"):
        checkpoint.load(path)
    assert cli.main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is corrupt" in err


class RunsCode:
    """Unpickling this calls os.mkdir(marker): a checkpoint that would run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    # Shaped like a pymeta checkpoint at the top; the code hides in a nested entry.
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "sha256": "0",
                "payload": {"model": RunsCode(str(marker))}}, evil)
    with pytest.raises(checkpoint.CheckpointError, match=r"was not loaded: reading it would call posix\.mkdir"):
        checkpoint.load(evil)
    assert cli.main(["eval", "--checkpoint", str(evil)]) == 2
    assert "run code from the file" in capsys.readouterr().err
    # The same inside a correctly checksummed payload: the inner load is restricted too.
    inner = io.BytesIO()
    torch.save({"model": RunsCode(str(marker))}, inner)
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION,
                "sha256": hashlib.sha256(inner.getvalue()).hexdigest(),
                "payload": torch.frombuffer(bytearray(inner.getvalue()), dtype=torch.uint8)}, evil)
    with pytest.raises(checkpoint.CheckpointError, match=r"reading it would call posix\.mkdir"):
        checkpoint.load(evil)
    assert not marker.exists()
    # Sanity check of the test itself: an unrestricted load does run it.
    torch.load(io.BytesIO(inner.getvalue()), weights_only=False)
    assert marker.is_dir()


def test_old_format_checkpoints_get_a_clear_message(tmp_path):
    old = tmp_path / "old.pt"
    # Format 1 stored the numpy RNG state as pickled numpy objects.
    torch.save({"format": checkpoint.FORMAT, "version": 1, "model": {}, "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(checkpoint.CheckpointError, match=r"old\.pt is a checkpoint of an older pymeta \(format 1"):
        checkpoint.load(old)
    torch.save({"format": checkpoint.FORMAT, "version": 7}, old)
    with pytest.raises(checkpoint.CheckpointError, match="has checkpoint format 7; this pymeta reads format 2"):
        checkpoint.load(old)
    torch.save({"weights": torch.ones(1)}, old)
    with pytest.raises(checkpoint.CheckpointError, match="is not a pymeta checkpoint"):
        checkpoint.load(old)
    assert zipfile.is_zipfile(old)


def test_a_hand_made_checkpoint_without_a_model_is_a_clear_error(tmp_path, capsys):
    config = {"algo": "maml", "data": "sinusoid"}
    checkpoint.save(tmp_path / "nomodel.pt", {"config": config})
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nomodel.pt")]) == 2
    assert "holds no model weights (no 'model' entry)" in capsys.readouterr().err


WRITER = """
import sys, torch
from pymeta import checkpoint
big = {"model": {"w": torch.zeros(32, 1024, 1024)}}  # 128 MiB: each write takes a while
while True:
    checkpoint.save(sys.argv[1], big)
"""


def test_temp_files_of_a_writer_killed_mid_write_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "run.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".run.pt.*.tmp")) and time.time() < deadline:
            time.sleep(0.005)
        os.kill(writer.pid, signal.SIGKILL)  # mid-write: the temp file exists
    finally:
        writer.kill()
        writer.wait()
    left = list(tmp_path.glob(".run.pt.*.tmp"))
    assert len(left) == 1 and f".run.pt.{writer.pid}@" in left[0].name
    # Another live run's temp file (this process's tag) must survive.
    live = tmp_path / f".run.pt.{_leftovers.owner_tag()}.abcd1234.tmp"
    live.write_bytes(b"being written")
    checkpoint.save(path, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "run.pt"])
    assert checkpoint.load(path)["step"] == 1
    # An old temp file no process has touched for long is stale whoever owns it.
    os.utime(live, (0, 0))
    assert checkpoint.remove_stale_temp_files(path) == [live]
