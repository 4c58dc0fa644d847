"""Meta-SGD: meta-gradients of the weights and of the per-element learning rates equal a
float64 per-task reference, in the batched and in the learn2learn-style API."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    conv_bn,
    mlp,
    per_task_sum,
    reference_meta_grads,
    regression_episode,
    relative_error,
)

import pymeta

CASES = {
    "mlp": (lambda: mlp(), regression_episode, F.mse_loss, 0.05),
    "conv_bn": (lambda: conv_bn(), classification_episode, F.cross_entropy, 0.3),
}


def metasgd_with_varied_lrs(model, lr, **kwargs) -> pymeta.MetaSGD:
    """A MetaSGD whose learning rates differ per element, so a mix-up of elements shows."""
    metasgd = pymeta.MetaSGD(model, lr=lr, **kwargs)
    with torch.no_grad():
        for rate in metasgd.lrs:
            rate.mul_(0.5 + torch.rand_like(rate))
    return metasgd


def lr_by_name(metasgd: pymeta.MetaSGD) -> dict[str, torch.Tensor]:
    return {n: rate for (n, _), rate in zip(metasgd.module.named_parameters(), metasgd.lrs, strict=True)}


@pytest.mark.parametrize("strategy", ["lowered", "vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_meta_gradient_matches_reference_including_lrs(case, steps, strategy, first_order):
    build, make_episode, loss_fn, lr = CASES[case]
    model = build().double()
    episode = make_episode()
    sx, sy, qx, qy = episode
    metasgd = metasgd_with_varied_lrs(
        model, lr, steps=steps, loss_fn=loss_fn, first_order=first_order, strategy=strategy
    )
    pred = metasgd.episode(sx, sy, qx)
    wrt = [*model.parameters(), *metasgd.lrs]
    grads = torch.autograd.grad(per_task_sum(loss_fn, pred, qy), wrt)
    expected = reference_meta_grads(
        model, episode, loss_fn, lr_by_name(metasgd), steps, first_order=first_order, also=list(metasgd.lrs)
    )
    err = relative_error(grads, expected)
    lr_err = relative_error(grads[-len(metasgd.lrs):], expected[-len(metasgd.lrs):])
    print(f"{case} steps={steps} {strategy} first_order={first_order}: rel err {err:.3e}, lrs {lr_err:.3e}")
    assert err < 1e-10 and lr_err < 1e-10
    assert all(g.abs().sum() > 0 for g in grads[-len(metasgd.lrs):])


@pytest.mark.parametrize("first_order", [False, True])
def test_clone_adapt_matches_reference_including_lrs(first_order):
    model = mlp().double()
    episode = regression_episode()
    sx, sy, qx, qy = episode
    metasgd = metasgd_with_varied_lrs(model, 0.05, first_order=first_order)
    meta_loss = 0.0
    for t in range(sx.shape[0]):  # the canonical learn2learn loop
        learner = metasgd.clone()
        for _ in range(2):
            learner.adapt(F.mse_loss(learner(sx[t]), sy[t]))
        meta_loss = meta_loss + F.mse_loss(learner(qx[t]), qy[t])
    wrt = [*model.parameters(), *metasgd.lrs]
    grads = torch.autograd.grad(meta_loss, wrt)
    expected = reference_meta_grads(
        model, episode, F.mse_loss, lr_by_name(metasgd), 2, first_order=first_order, also=list(metasgd.lrs)
    )
    err = relative_error(grads, expected)
    print(f"first_order={first_order}: relative error {err:.3e}")
    assert err < 1e-10


def test_lrs_layout_matches_learn2learn():
    model = mlp()
    metasgd = pymeta.MetaSGD(model, lr=0.3)
    assert pymeta.MetaSGD(mlp()).lr == 1.0  # learn2learn's default
    assert [tuple(r.shape) for r in metasgd.lrs] == [tuple(p.shape) for p in model.parameters()]
    assert all(torch.all(r == 0.3) for r in metasgd.lrs)
    lr_keys = [k for k in metasgd.state_dict() if k.startswith("lrs.")]
    assert lr_keys == [f"lrs.{i}" for i in range(len(list(model.parameters())))]
    # The optimizer sees the weights and the learning rates.
    assert len(list(metasgd.parameters())) == 2 * len(list(model.parameters()))
    # A clone shares the learning rates (their meta-gradients land on the original).
    assert metasgd.clone().lrs is metasgd.lrs


def test_learns_and_state_dict_round_trips():
    model = mlp().double()
    metasgd = pymeta.MetaSGD(model, lr=0.05)
    opt = torch.optim.Adam(metasgd.parameters(), lr=1e-2)
    sx, sy, qx, qy = regression_episode(tasks=4)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(metasgd.episode(sx, sy, qx), qy)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"meta-loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]
    assert any(not torch.all(r == 0.05) for r in metasgd.lrs)  # the rates were learned
    other = pymeta.MetaSGD(mlp().double(), lr=0.05)
    other.load_state_dict(metasgd.state_dict())
    torch.testing.assert_close(other.episode(sx, sy, qx), metasgd.episode(sx, sy, qx))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.1"):
        pymeta.MetaSGD(mlp(), lr=-0.1)
    with pytest.raises(ValueError, match=r"steps must be >= 0, got -1"):
        pymeta.MetaSGD(mlp(), lr=0.1, steps=-1)
    with pytest.raises(ValueError, match=r"strategy must be one of"):
        pymeta.MetaSGD(mlp(), lr=0.1, strategy="fast")
