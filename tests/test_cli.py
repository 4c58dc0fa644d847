"""The pymeta command end to end on a tiny budget, and checkpoint round trips."""

import subprocess
import sys

import pytest
import torch

from pymeta import checkpoint, cli, training


def run(*argv: str) -> int:
    return cli.main(list(argv))


def test_train_then_eval_round_trips_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "maml.pt"
    code = run("train", "--algo", "maml", "--data", "sinusoid", "--iterations", "30", "--meta-batch", "5",
               "--val-episodes", "10", "--eval-episodes", "20", "--out", str(out), "--no-progress")
    assert code == 0
    trained = capsys.readouterr().out
    assert "test MSE after adaptation (10-shot, 1 step):" in trained
    assert "test MSE before adaptation:" in trained
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))
    payload = checkpoint.load(out)
    assert payload["config"]["iterations"] == 30 and payload["step"] >= 3

    assert run("eval", "--checkpoint", str(out), "--episodes", "20", "--no-progress") == 0
    evaluated = capsys.readouterr().out
    # Same held-out tasks, same weights: eval reproduces train's final report exactly.
    assert evaluated.strip().splitlines()[-2:] == trained.strip().splitlines()[-3:-1]


def test_python_dash_m_and_info():
    result = subprocess.run([sys.executable, "-m", "pymeta", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "op backends:" in result.stdout and "reference  available" in result.stdout


def test_eval_reports_missing_and_corrupt_checkpoints(tmp_path, capsys):
    assert run("eval", "--checkpoint", str(tmp_path / "nope.pt")) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert run("eval", "--checkpoint", str(bad)) == 2
    assert "corrupt or unreadable" in capsys.readouterr().err


def test_unknown_algo_or_data_is_a_clear_error(capsys):
    assert run("train", "--algo", "nope", "--iterations", "1", "--no-progress") == 2
    assert "algo must be one of" in capsys.readouterr().err
    assert run("train", "--data", "mnist", "--iterations", "1", "--no-progress") == 2
    assert "data must be one of" in capsys.readouterr().err


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(path, {"step": 2, "bad": Unpicklable()})
    assert checkpoint.load(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_from_another_config_is_a_clear_error(tmp_path):
    out = tmp_path / "ck.pt"
    config = training.TrainConfig(iterations=2, meta_batch=2, val_episodes=2, eval_episodes=2, out=str(out))
    training.train(config, progress=False, log=lambda _: None)
    payload = checkpoint.load(out)
    payload["model"] = {k: torch.zeros(1) for k in payload["model"]}
    checkpoint.save(out, payload)
    with pytest.raises(checkpoint.CheckpointError, match="does not match its config"):
        training.load_learner(out)


def test_report_line_names_inner_steps_only_for_learners_that_adapt():
    from types import SimpleNamespace

    spec, stats = SimpleNamespace(task="classification"), training.Stats(0.9, 0.01, 600)
    proto = training.TrainConfig(algo="protonet").resolved()
    assert training.report_line(proto, spec, stats, None) == f"test accuracy (5-way 1-shot): {stats}"
    maml = training.TrainConfig(algo="maml", inner_steps=3).resolved()
    assert training.report_line(maml, spec, stats, stats).startswith("test accuracy after adaptation (5-way 1-shot, 3 steps)")


def test_report_line_states_the_batchnorm_policy_of_the_evaluation():
    from types import SimpleNamespace

    from pymeta.models import conv4, mlp

    spec, stats = SimpleNamespace(task="classification"), training.Stats(0.9, 0.01, 600)
    config = training.TrainConfig(algo="protonet").resolved()
    with_bn = training.report_line(config, spec, stats, None, conv4(1, n_way=None, image_size=28))
    assert with_bn.endswith("BatchNorm: per-task batch statistics of each task's examples "
                            "(transductive, as the papers' reference code evaluates)")
    assert "BatchNorm" not in training.report_line(config, spec, stats, None, mlp(1, (8,), 1))
