"""The pymeta command end to end on a tiny budget, and checkpoint round trips."""

import subprocess
import sys

import pytest
import torch

from pymeta import checkpoint, cli, training
from pymeta.algorithms import LEARNERS


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


SINUSOID = ["--algo", "maml", "--data", "sinusoid"]
BAD_OPTIONS = [
    (["--algo", "nope"], "argument --algo: invalid choice: 'nope' (choose from 'anil', 'finetune'"),
    (["--data", "mnist"], "data must be one of ['folder', 'glyphs', 'sinusoid'] or folder:PATH, got 'mnist'"),
    ([*SINUSOID, "--iterations", "0"], "--iterations must be >= 1, got 0"),
    ([*SINUSOID, "--iterations", "-3"], "--iterations must be >= 1, got -3"),
    ([*SINUSOID, "--val-every", "0"], "--val-every must be >= 1, got 0"),
    ([*SINUSOID, "--device", "banana"], "--device must be a torch device such as cpu, cuda or cuda:1, got 'banana'"),
    ([*SINUSOID, "--eval-episodes", "0"], "--eval-episodes must be >= 1, got 0"),
    ([*SINUSOID, "--val-episodes", "-1"], "--val-episodes must be >= 1, got -1"),
    (["--ways", "250"], "the val split of --data glyphs is too small for --ways 250 --shots 1 --queries 5: "
                        "n_way = 250 but the dataset has only 197 classes"),
    (["--data", "sinusoid", "--algo", "protonet"], "--algo protonet classifies, but --data sinusoid is a "
                                                   "regression family"),
    ([*SINUSOID, "--ways", "5"], "--ways does not apply to --data sinusoid, a regression family"),
    (["--shots", "-1"], "--shots must be >= 1, got -1"),
    (["--shots", "0"], "--shots must be >= 1, got 0"),
    (["--ways", "1"], "--ways must be >= 2 (a task tells N classes apart), got 1"),
    ([*SINUSOID, "--outer-lr", "0"], "--outer-lr must be a finite number > 0, got 0.0"),
    ([*SINUSOID, "--inner-lr", "nan"], "--inner-lr must be a finite number > 0, got nan"),
    ([*SINUSOID, "--eval-inner-steps", "-1"], "--eval-inner-steps must be >= 0, got -1"),
    ([*SINUSOID, "--task-chunk", "0"], "--task-chunk must be >= 1, got 0"),
    ([*SINUSOID, "--nproc", "0"], "--nproc must be >= 1, got 0"),
    ([*SINUSOID, "--meta-batch", "2", "--nproc", "3"], "--nproc 3 needs --meta-batch >= 3"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append(([*SINUSOID, "--device", "cuda"], "--device cuda: no CUDA device is visible to torch"))


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_errors_before_any_training(tmp_path, capsys, options, message):
    code = run("train", *options, "--out", str(tmp_path / "run.pt"), "--no-progress")
    err = capsys.readouterr().err
    print(err)
    assert code == 2
    assert err.startswith("pymeta train: error: ") and err.count("\n") == 1 and message in err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_train_help_lists_the_choices_and_every_default(capsys):
    assert run("train", "--help") == 0
    text = capsys.readouterr().out
    assert "{" + ",".join(sorted(LEARNERS)) + "}" in text and "relationnet" in text
    assert "{sinusoid,glyphs,folder:PATH}" in text
    for action in cli.parser()._subparsers._group_actions[0].choices["train"]._actions:
        if action.dest != "help":
            assert "default" in action.help, f"{action.option_strings} does not show its default"
    flat = " ".join(text.split())
    assert "--seed SEED seed of the model's initial weights and of the task streams" in flat
    assert "--device DEVICE torch device to train on: cpu, cuda or cuda:N" in flat
    assert "(default per --data: sinusoid 10, glyphs 1, folder 1; mann/lstm: glyphs 10, folder 10)" in flat  # --shots


def test_train_help_names_the_learners_that_take_each_option():
    """The option lists come from the learners' ``cli_options``, not a hand-kept list."""
    helps = {a.dest: a.help for a in cli.parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert all(name in helps["task_chunk"] for name in ("mamlpp", "matchingnet", "relationnet", "protonet", "anil"))
    assert "mamlpp" in helps["checkpoint_steps"] and "fomaml" not in helps["checkpoint_steps"]  # first order
    for option in ("task_chunk", "checkpoint_steps", "cuda_graph"):
        assert "reptile" not in helps[option] and "lstm" not in helps[option], option


def test_default_out_is_not_overwritten_by_a_run_of_another_config(tmp_path, capsys):
    out = str(tmp_path / "pymeta.pt")
    tiny = ["--iterations", "2", "--meta-batch", "2", "--val-episodes", "2", "--eval-episodes", "2", "--strategy", "vmap",
            "--no-progress",
            "--out", out]
    assert run("train", *SINUSOID, *tiny) == 0
    before = checkpoint.load(out)
    assert run("train", "--algo", "reptile", "--data", "sinusoid", *tiny) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a checkpoint of another run (algo='maml' in the checkpoint, 'reptile' now" in err
    assert "pass --out PATH for this run, or --overwrite to replace it" in err
    after = checkpoint.load(out)
    assert after["config"] == before["config"] and all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert run("train", *SINUSOID, *tiny, "--iterations", "3") == 0  # the same config (more steps) may
    assert run("train", "--algo", "reptile", "--data", "sinusoid", *tiny, "--overwrite") == 0
    assert checkpoint.load(out)["config"]["algo"] == "reptile"
    (tmp_path / "pymeta.pt").write_text("my notes")  # not a checkpoint: never replaced silently
    assert run("train", *SINUSOID, *tiny) == 2
    assert "exists and is not a checkpoint this run may replace" in capsys.readouterr().err


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


@pytest.mark.parametrize("algo", sorted(name for name, cls in LEARNERS.items()
                                        if "regression" not in cls.cli_tasks))
def test_classifiers_on_regression_data_are_refused_before_any_training(tmp_path, capsys, algo):
    assert run("train", "--algo", algo, "--data", "sinusoid", "--out", str(tmp_path / "x.pt"), "--no-progress") == 2
    assert f"--algo {algo} classifies, but --data sinusoid is a regression family" in capsys.readouterr().err
