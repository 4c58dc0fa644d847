"""Checkpoints hold the whole training state; resuming reproduces the uninterrupted run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pymeta import checkpoint, cli, training


def config(tmp_path, name: str, iterations: int, **overrides) -> training.TrainConfig:
    settings = dict(algo="maml", data="sinusoid", iterations=iterations, meta_batch=4, val_every=3,
                    val_episodes=4, eval_episodes=4, strategy="vmap", out=str(tmp_path / f"{name}.pt"))
    return training.TrainConfig(**{**settings, **overrides})


def global_rng() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, algo):
    """6 steps in one go vs 3 steps + resume from the "last" checkpoint + 3 steps: the
    same losses, parameters, optimizer state, history and global RNG states, bitwise."""
    full = training.train(config(tmp_path, "full", 6, algo=algo), progress=False, log=quiet)
    full_rng = global_rng()
    training.train(config(tmp_path, "part", 3, algo=algo), progress=False, log=quiet)
    # Another process would start from other RNG states: they must come from the checkpoint.
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    resumed = training.train(config(tmp_path, "part", 6, algo=algo), progress=False, log=quiet,
                             resume=tmp_path / "part-last.pt")
    a, b = checkpoint.load(tmp_path / "full-last.pt"), checkpoint.load(tmp_path / "part-last.pt")
    print(f"{algo}: uninterrupted losses {full.losses}, resumed {resumed.losses}")
    assert resumed.losses == full.losses[3:]
    assert a["step"] == b["step"] == 6 and a["data"] == b["data"] == {"seed": 0, "batches": 6}
    np.testing.assert_equal([a["history"], a["running"]], [b["history"], b["running"]])  # NaN == NaN here
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    rng = global_rng()
    assert torch.equal(rng[0], full_rng[0]) and np.array_equal(rng[1], full_rng[1]) and rng[2] == full_rng[2]
    assert resumed.test == full.test


def test_last_and_best_checkpoints(tmp_path):
    """Every validation writes <stem>-last.pt; <out> only when validation improves; the
    last one also carries the best model so a resumed run can still report it."""
    training.train(config(tmp_path, "run", 9), progress=False, log=quiet)
    best, last = checkpoint.load(tmp_path / "run.pt"), checkpoint.load(tmp_path / "run-last.pt")
    assert last["step"] == 9 and [h["step"] for h in last["history"]] == [3, 6, 9]
    vals = [h["val"] for h in last["history"]]
    assert best["step"] == 3 * (vals.index(min(vals)) + 1) and best["best_val"] == last["best_val"] == min(vals)
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, last["best_model"][name])
    assert set(best) >= {"config", "model", "optimizer", "step", "data", "rng", "strategies", "running"}


def test_resume_keeps_the_strategy_auto_chose(tmp_path):
    """With strategy="auto" the choice is made by timing; the checkpoint stores it and a
    resumed run uses it instead of measuring again (which could choose differently)."""
    training.train(config(tmp_path, "auto", 32, strategy="auto", val_every=32), progress=False, log=quiet)
    chosen = checkpoint.load(tmp_path / "auto-last.pt")["strategies"]
    assert set(chosen) == {"_picker"} and chosen["_picker"] in ("lowered", "loop")  # an MLP lowers
    resumed = training.train(config(tmp_path, "auto", 33, strategy="auto", val_every=32), progress=False, log=quiet,
                             resume=tmp_path / "auto-last.pt")
    assert resumed.learner.strategy == chosen["_picker"]
    assert not any(resumed.learner._picker._times.values())  # nothing was re-measured


def test_resume_keeps_the_strategy_protonet_chose(tmp_path):
    """ProtoNet with the conv4 encoder (BatchNorm) picks how to embed the tasks; its
    choice is checkpointed and restored like MAML's."""
    settings = dict(algo="protonet", data="glyphs", meta_batch=2, val_episodes=2, eval_episodes=2,
                    strategy="auto", val_every=32)
    # 32 steps: a warm-up, up to 15 timed calls per candidate and the call that closes the last.
    training.train(config(tmp_path, "proto", 32, **settings), progress=False, log=quiet)
    chosen = checkpoint.load(tmp_path / "proto-last.pt")["strategies"]
    assert set(chosen) == {"_picker"} and chosen["_picker"] in ("lowered", "vmap", "loop")
    resumed = training.train(config(tmp_path, "proto", 33, **settings), progress=False, log=quiet,
                             resume=tmp_path / "proto-last.pt")
    assert resumed.learner.strategy == chosen["_picker"]
    assert all(not times for times in resumed.learner._picker._times.values())  # nothing re-measured


def test_resume_rejects_other_configs_and_bad_files(tmp_path, capsys):
    out = tmp_path / "ck.pt"
    base = ["train", "--algo", "maml", "--data", "sinusoid", "--meta-batch", "2", "--val-every", "2",
            "--val-episodes", "2", "--eval-episodes", "2", "--no-progress", "--out", str(out)]
    assert cli.main([*base, "--iterations", "2"]) == 0
    last = str(tmp_path / "ck-last.pt")
    capsys.readouterr()

    def resume(*extra: str, path: str = last) -> str:
        assert cli.main([*base, *extra, "--resume", path]) == 2
        return capsys.readouterr().err

    assert "algo='maml' in the checkpoint, 'fomaml' now" in resume("--algo", "fomaml")
    assert "shots=10 in the checkpoint, 5 now" in resume("--shots", "5")
    assert "cannot resume from" in resume("--inner-lr", "0.5", "--nproc", "2")  # checked before spawning

    payload = checkpoint.load(last)
    checkpoint.save(tmp_path / "shape.pt", {**payload, "model": {k: torch.zeros(2) for k in payload["model"]}})
    assert "does not match its config" in resume(path=str(tmp_path / "shape.pt"))
    checkpoint.save(tmp_path / "old.pt", {k: v for k, v in payload.items() if k not in ("rng", "data")})
    assert "no training state to resume from (missing ['data', 'rng'])" in resume(path=str(tmp_path / "old.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    assert "corrupt or unreadable" in resume(path=str(tmp_path / "corrupt.pt"))
    assert "checkpoint not found" in resume(path=str(tmp_path / "missing.pt"))

    # Run settings may change: more iterations continue the run.
    assert cli.main([*base, "--iterations", "4", "--resume", last]) == 0
    assert checkpoint.load(last)["step"] == 4


def test_shuffled_batches_resume_exactly():
    """FineTune's pre-training batches (its resumable data source) continue exactly."""
    data = [(torch.full((2,), float(i)), i % 3) for i in range(10)]
    stream = training.ShuffledBatches(data, batch_size=3, seed=5)
    batches = iter(stream)
    first = [next(batches) for _ in range(4)]  # crosses an epoch (3 full batches of 3 per epoch)
    assert {int(v) for b in first[:3] for v in b.x[:, 0]} <= set(range(10))
    again = training.ShuffledBatches(data, batch_size=3, seed=0)
    again.load_state_dict({"seed": 5, "batches": 2})
    for expected, actual in zip(first[2:], iter(again), strict=False):
        assert torch.equal(expected.x, actual.x) and torch.equal(expected.y, actual.y)
    assert stream.state_dict() == {"seed": 5, "batches": 4}


def test_memory_options_train_the_same_model_and_are_refused_where_they_do_not_apply(tmp_path):
    """--task-chunk / --checkpoint-steps change memory, not the trajectory (up to rounding)."""
    runs = {
        name: training.train(config(tmp_path, name, 4, inner_steps=2, **options), progress=False, log=quiet)
        for name, options in {"plain": {}, "lean": {"task_chunk": 1, "checkpoint_steps": True}}.items()
    }
    for (name, a), b in zip(runs["plain"].learner.state_dict().items(), runs["lean"].learner.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert runs["lean"].learner.task_chunk == 1 and runs["lean"].learner.checkpoint_steps
    with pytest.raises(ValueError, match=r"task_chunk only applies to algo anil, fomaml, maml, mamlpp, matchingnet, "
                                         r"metasgd, protonet, relationnet, relationnet-ce, got algo 'reptile'"):
        config(tmp_path, "bad", 2, algo="reptile", task_chunk=2).resolved()
    with pytest.raises(ValueError, match=r"checkpoint_steps only applies to algo fomaml, maml, mamlpp, metasgd, "
                                         r"got algo 'protonet'"):
        config(tmp_path, "bad", 2, algo="protonet", checkpoint_steps=True).resolved()
    with pytest.raises(ValueError, match=r"checkpoint_steps recomputes second-order inner steps; first-order"):
        config(tmp_path, "bad", 2, algo="fomaml", checkpoint_steps=True).resolved()
