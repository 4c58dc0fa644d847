"""Batched MAML: meta-gradients equal a float64 per-task reference, strategies agree."""


import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    conv_bn,
    mlp,
    mlp_norms,
    per_task_sum,
    reference_meta_grads,
    regression_episode,
    relative_error,
)

import pymeta
from pymeta.core.batched import StrategyPicker

CASES = {
    "mlp": (lambda: mlp(), regression_episode, F.mse_loss, 0.05),
    "mlp_norms": (mlp_norms, regression_episode, F.mse_loss, 0.05),
    "conv_bn": (lambda: conv_bn(), classification_episode, F.cross_entropy, 0.3),
}


@pytest.mark.parametrize("strategy", ["lowered", "vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_per_task_reference(case, steps, strategy, first_order):
    build, make_episode, loss_fn, lr = CASES[case]
    model = build().double()
    episode = make_episode()
    sx, sy, qx, qy = episode
    maml = pymeta.MAML(model, lr=lr, steps=steps, loss_fn=loss_fn, first_order=first_order, strategy=strategy)
    pred = maml.episode(sx, sy, qx)
    grads = torch.autograd.grad(per_task_sum(loss_fn, pred, qy), list(model.parameters()))
    expected = reference_meta_grads(model, episode, loss_fn, lr, steps, first_order=first_order)
    err = relative_error(grads, expected)
    print(f"{case} steps={steps} {strategy} first_order={first_order}: relative error {err:.3e}")
    assert err < 1e-10


def test_batchnorm_running_stats_untouched_and_model_usable_after():
    model = conv_bn().double()
    before = {n: b.clone() for n, b in model.named_buffers()}
    sx, sy, qx, _ = classification_episode()
    pymeta.MAML(model, lr=0.1, strategy="vmap").episode(sx, sy, qx)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    model(sx[0])  # the plain module still runs (and updates its stats) outside episodes


def test_strategies_give_identical_predictions_and_auto_settles():
    model = mlp().double()
    sx, sy, qx, _ = regression_episode()
    preds = {s: pymeta.MAML(model, lr=0.05, strategy=s).episode(sx, sy, qx) for s in ("lowered", "vmap", "loop")}
    torch.testing.assert_close(preds["vmap"], preds["loop"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(preds["lowered"], preds["loop"], rtol=1e-12, atol=1e-12)
    auto = pymeta.MAML(model, lr=0.05)
    assert auto.strategy is None
    for _ in range(32):  # warm-up, up to 15 timed calls per candidate, the call that closes the last
        torch.testing.assert_close(auto.episode(sx, sy, qx), preds["vmap"], rtol=1e-12, atol=1e-12)
    assert auto.strategy in ("lowered", "loop")  # an MLP lowers, so vmap is not a candidate


def test_zero_steps_is_the_unadapted_model():
    model = mlp().double()
    sx, sy, qx, _ = regression_episode()
    pred = pymeta.MAML(model, lr=0.05, steps=0).episode(sx, sy, qx)
    torch.testing.assert_close(pred, torch.stack([model(x) for x in qx]))


def test_episode_under_no_grad_still_adapts():
    model = mlp().double()
    sx, sy, qx, qy = regression_episode()
    maml = pymeta.MAML(model, lr=0.05, steps=2)
    expected = maml.episode(sx, sy, qx).detach()
    with torch.no_grad():
        pred = maml.episode(sx, sy, qx)
    assert not pred.requires_grad
    torch.testing.assert_close(pred, expected)
    assert F.mse_loss(pred, qy) != F.mse_loss(pymeta.MAML(model, lr=0.05, steps=0).episode(sx, sy, qx), qy)


def test_trains_with_any_optimizer_and_state_dict_round_trips():
    model = mlp().double()
    maml = pymeta.MAML(model, lr=0.05, steps=1)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-2)
    sx, sy, qx, qy = regression_episode(tasks=4)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(maml.episode(sx, sy, qx), qy)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    other = pymeta.MAML(mlp().double(), lr=0.05)
    other.load_state_dict(maml.state_dict())
    torch.testing.assert_close(other.episode(sx, sy, qx), maml.episode(sx, sy, qx))


class FakeClock:
    """A clock the test advances by each call's cost: the picker's logic without sleeping
    (real sleeps overrun by milliseconds on a loaded machine)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_strategy_picker_warms_up_interleaves_and_drops_a_clearly_slower_candidate():
    clock = FakeClock()
    picker = StrategyPicker("auto", trials=3, candidates=("lowered", "loop"), min_time=0, clock=clock)
    cost = {"lowered": 0.03, "loop": 0.001}
    order = []
    while picker.chosen is None:
        with picker.timed() as strategy:
            order.append(strategy)
            clock.now += cost[strategy]
    # warm-up (untimed), one timed call each (each timed until the next call starts),
    # then the 30x slower one is dropped and the fourth call already runs the choice
    assert order == ["lowered", "lowered", "loop", "loop"] and picker.chosen == "loop"
    close = StrategyPicker("auto", trials=2, candidates=("vmap", "loop"), min_time=0, clock=clock)
    order = []
    while close.chosen is None:
        with close.timed() as strategy:
            order.append(strategy)
            clock.now += {"vmap": 0.004, "loop": 0.005}[strategy]
    assert order == ["vmap", "vmap", "loop", "vmap", "loop", "vmap"] and close.chosen == "vmap"
    fixed = StrategyPicker("loop")
    with fixed.timed() as strategy:
        assert strategy == "loop" and fixed.chosen == "loop"


def test_strategy_picker_prefers_the_earlier_candidate_within_the_tie_margin():
    clock = FakeClock()
    picker = StrategyPicker("auto", trials=2, candidates=("lowered", "loop"), tie=0.5, min_time=0, clock=clock)
    while picker.chosen is None:
        with picker.timed() as strategy:
            clock.now += {"lowered": 0.006, "loop": 0.005}[strategy]  # 20% slower: within 50%
    assert picker.chosen == "lowered"
    # Short calls are measured until each candidate has min_time seconds (or max_trials).
    budget = StrategyPicker("auto", trials=2, candidates=("lowered", "loop"), min_time=0.02, max_trials=50,
                            clock=clock)
    count = 0
    while budget.chosen is None:
        with budget.timed() as strategy:
            count += 1
            clock.now += 0.004 if strategy == "lowered" else 0.0045
    # 0.02 s at 4 / 4.5 ms per call: 5 calls each, the warm-up, and the call that closes the last
    assert count == 2 * 5 + 2
