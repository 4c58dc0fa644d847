"""Non-finite values, mixed precision and deterministic training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import report
from helpers import cluster_episode, mlp, regression_episode, relative_error
from torch import nn

import pymeta
from pymeta import training


def linear(weight: float = 0.0) -> nn.Module:
    model = nn.Linear(1, 1)
    nn.init.constant_(model.weight, weight)
    nn.init.zeros_(model.bias)
    return model


def test_nan_input_names_the_task_and_step():
    sx, sy, qx, _ = regression_episode(tasks=5)
    sx[3, 2] = math.nan
    maml = pymeta.MAML(mlp().double(), lr=0.1, steps=2, check_finite=True)
    with pytest.raises(FloatingPointError, match=r"^inner loop: task 3 step 0 has a non-finite loss \(nan\)$"):
        maml.episode(sx, sy, qx)


def test_overflow_at_a_later_step_names_that_step():
    """Task 2's targets are huge: its loss is finite at step 0, its update overflows
    float32, and step 1's loss is inf."""
    sx = torch.ones(4, 3, 1)
    sy = torch.ones(4, 3, 1)
    sy[2] = 1e15
    maml = pymeta.MAML(linear(), lr=1e10, steps=3, check_finite=True)
    with pytest.raises(FloatingPointError, match=r"^inner loop: task 2 step 1 has a non-finite loss \(inf\)$"):
        maml.episode(sx, sy, sx)


def test_non_finite_gradient_with_a_finite_loss_names_the_weight():
    """sqrt(|pred - y|) is finite at pred == y but its gradient there is not."""

    def sqrt_loss(pred, y):
        return (pred - y).abs().sqrt().mean()

    sx = torch.ones(3, 2, 1)
    sy = torch.ones(3, 2, 1)
    sy[1, 0] = 0.0  # the zero-initialised model predicts exactly 0 here
    maml = pymeta.MAML(linear(), lr=0.1, loss_fn=sqrt_loss, check_finite=True)
    with pytest.raises(FloatingPointError, match=r"^inner loop: task 1 step 0 has a non-finite gradient of 'weight'"):
        maml.episode(sx, sy, sx)


def test_off_by_default_nan_stays_in_its_task():
    """The library default is the fast path without the check: NaN propagates, but only
    into the task that produced it (tasks share nothing in the inner loop)."""
    sx, sy, qx, _ = regression_episode(tasks=5)
    sx[3, 2] = math.nan
    pred = pymeta.MAML(mlp().double(), lr=0.1, steps=2).episode(sx, sy, qx)
    assert pred[3].isnan().all() and pred[[0, 1, 2, 4]].isfinite().all()


@pytest.mark.parametrize("algo", ["metasgd", "anil", "reptile", "finetune"])
def test_every_inner_loop_algorithm_takes_the_option(algo):
    sx, sy, qx, _ = cluster_episode(tasks=4, ways=3)
    sx[2, 0, 0] = math.inf
    if algo == "metasgd":
        learner = pymeta.MetaSGD(nn.Linear(8, 3).double(), lr=0.1, check_finite=True)
    elif algo == "anil":
        learner = pymeta.ANIL(nn.Linear(8, 8).double(), nn.Linear(8, 3).double(), lr=0.1, check_finite=True)
    elif algo == "reptile":
        learner = pymeta.Reptile(nn.Linear(8, 3).double(), lr=0.1, steps=2, check_finite=True)
    else:
        learner = pymeta.FineTune(nn.Linear(8, 8).double(), 3, lr=0.1, steps=2, base_classes=5, feature_dim=8,
                                  check_finite=True)
    with pytest.raises(FloatingPointError, match=r"^inner loop: task 2 step 0 has a non-finite loss"):
        if algo == "reptile":
            learner.outer_grad(sx, sy)
        else:
            learner.episode(sx, sy, qx)


def tiny(**overrides) -> training.TrainConfig:
    settings = dict(algo="maml", data="sinusoid", iterations=4, meta_batch=4, val_every=4, val_episodes=4,
                    eval_episodes=4, strategy="vmap")
    return training.TrainConfig(**{**settings, **overrides})


def test_training_stops_before_nan_reaches_the_meta_parameters(tmp_path):
    """With an absurd inner learning rate the adapted weights overflow: training (check on
    by default in TrainConfig and the CLI) raises at the first bad step, naming it; with
    the check off the same run silently ends with NaN meta-parameters."""
    out = str(tmp_path / "ck.pt")
    with pytest.raises(FloatingPointError, match=r"^inner loop: task \d step 1 has a non-finite loss"):
        training.train(tiny(inner_lr=1e30, inner_steps=2, out=out), progress=False, log=lambda _: None)
    with pytest.raises(FloatingPointError, match=r"^step 1: the meta-loss is non-finite \((nan|inf)\)"):
        training.train(tiny(inner_lr=1e30, inner_steps=1, out=out), progress=False, log=lambda _: None)
    result = training.train(tiny(inner_lr=1e30, inner_steps=1, out=out, check_finite=False), progress=False,
                            log=lambda _: None)
    assert not all(p.isfinite().all() for p in result.learner.parameters())


def maml_meta_grads(model: nn.Module, episode, bf16: bool, first_order: bool = False) -> list[torch.Tensor]:
    sx, sy, qx, qy = episode
    maml = pymeta.MAML(model, lr=0.1, steps=2, first_order=first_order, loss_fn=F.mse_loss, strategy="vmap")
    maml.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pred = maml.episode(sx, sy, qx)
        F.mse_loss(pred.float(), qy).backward()
    return [p.grad.clone() for p in maml.parameters()]


def test_bf16_autocast_meta_gradients_are_within_bf16_error():
    """MAML (second order, 2 steps) on an MLP under CPU bf16 autocast: the meta-gradient
    is within a tolerance derived from bf16's epsilon (2^-7) of the float32 one. The
    error must be above float32 level (bf16 really ran), and the tolerance is tight
    enough to reject a real mistake: dropping the second-order terms misses it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    episode = [t.float() for t in regression_episode(tasks=8, shots=10, queries=10)]
    exact = maml_meta_grads(model, episode, bf16=False)
    mixed = maml_meta_grads(model, episode, bf16=True)
    wrong = maml_meta_grads(model, episode, bf16=False, first_order=True)
    eps = torch.finfo(torch.bfloat16).eps  # 2^-7 = 7.8e-3
    tolerance = 6 * eps  # a few roundings per layer through forward, inner and outer backward
    err, wrong_err = relative_error(mixed, exact), relative_error(wrong, exact)
    report("bf16 vs float32 meta-gradient", torch.cat([g.flatten() for g in mixed]),
           torch.cat([g.flatten() for g in exact]))
    print(f"relative error {err:.2e} (tolerance {tolerance:.2e}); first-order instead: {wrong_err:.2e}")
    assert torch.finfo(torch.float32).eps * 100 < err < tolerance < wrong_err


@pytest.mark.parametrize(("algo", "data"), [("maml", "sinusoid"), ("protonet", "glyphs")])
def test_deterministic_algorithms_give_identical_runs(tmp_path, algo, data):
    """With a seed, a fixed strategy and torch.use_deterministic_algorithms(True), two
    training runs log identical losses and end with identical parameters."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [
            training.train(tiny(algo=algo, data=data, iterations=3, meta_batch=2, val_every=3, val_episodes=2,
                                eval_episodes=2, out=str(tmp_path / f"run{i}.pt")),
                           progress=False, log=lambda _: None)
            for i in range(2)
        ]
    finally:
        torch.use_deterministic_algorithms(previous)
    print(f"{algo}: losses {runs[0].losses}")
    assert len(runs[0].losses) == 3 and runs[0].losses == runs[1].losses
    assert runs[0].history == runs[1].history
    for a, b in zip(runs[0].learner.state_dict().values(), runs[1].learner.state_dict().values(), strict=True):
        assert torch.equal(a, b)
