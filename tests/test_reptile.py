"""Reptile: the outer direction written to .grad equals a float64 per-task reference."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    conv_bn,
    mlp,
    reference_adapt,
    regression_episode,
    relative_error,
)

import pymeta

CASES = {
    "mlp": (lambda: mlp(), regression_episode, F.mse_loss, 0.05),
    "conv_bn": (lambda: conv_bn(), classification_episode, F.cross_entropy, 0.3),
}


def reference_direction(model, x, y, loss_fn, lr, steps) -> list[torch.Tensor]:
    """``theta - mean_t phi_t`` with each task adapted by its own explicit SGD loop."""
    params = dict(model.named_parameters())
    adapted = [reference_adapt(model, params, x[t], y[t], loss_fn, lr, steps, first_order=True) for t in range(len(x))]
    return [(p - torch.stack([phi[n] for phi in adapted]).mean(0)).detach() for n, p in params.items()]


@pytest.mark.parametrize("strategy", ["lowered", "vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_outer_direction_matches_per_task_reference(case, steps, strategy):
    build, make_episode, loss_fn, lr = CASES[case]
    model = build().double()
    sx, sy, _, _ = make_episode()
    reptile = pymeta.Reptile(model, lr=lr, steps=steps, outer_scale=0.5, loss_fn=loss_fn, strategy=strategy)
    before = {n: b.clone() for n, b in model.named_buffers()}
    reptile.outer_grad(sx, sy)
    grads = [p.grad for p in model.parameters()]
    expected = [0.5 * d for d in reference_direction(model, sx, sy, loss_fn, lr, steps)]
    err = relative_error(grads, expected)
    print(f"{case} steps={steps} {strategy}: relative error {err:.3e}")
    assert err < 1e-10
    assert not any(g.requires_grad for g in grads)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_sgd_step_moves_toward_the_adapted_weights_and_grads_accumulate():
    model = mlp().double()
    sx, sy, _, _ = regression_episode()
    reptile = pymeta.Reptile(model, lr=0.05, steps=2)
    direction = reference_direction(model, sx, sy, F.mse_loss, 0.05, 2)
    theta = [p.detach().clone() for p in model.parameters()]
    reptile.outer_grad(sx, sy)
    reptile.outer_grad(sx, sy)  # accumulates like backward()
    torch.testing.assert_close([p.grad for p in model.parameters()], [2 * d for d in direction])
    torch.optim.SGD(reptile.parameters(), lr=0.25).step()
    # theta + 0.5 * (mean phi - theta)
    torch.testing.assert_close(list(model.parameters()), [t - 0.5 * d for t, d in zip(theta, direction, strict=True)])


def test_episode_is_first_order_adaptation_and_works_under_no_grad():
    model = mlp().double()
    sx, sy, qx, _ = regression_episode()
    reptile = pymeta.Reptile(model, lr=0.05, steps=3)
    fomaml = pymeta.MAML(model, lr=0.05, steps=3, first_order=True)
    torch.testing.assert_close(reptile.episode(sx, sy, qx), fomaml.episode(sx, sy, qx))
    with torch.no_grad():
        pred = reptile.episode(sx, sy, qx)
    torch.testing.assert_close(pred, fomaml.episode(sx, sy, qx).detach())


def test_learns_and_state_dict_round_trips():
    model = mlp().double()
    reptile = pymeta.Reptile(model, lr=0.02, steps=5)
    opt = torch.optim.SGD(reptile.parameters(), lr=0.5)
    sx, sy, qx, qy = regression_episode(tasks=4)
    x, y = torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)

    def adapted_query_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(reptile.episode(sx, sy, qx), qy).item()

    losses = [adapted_query_loss()]
    for _ in range(30):
        opt.zero_grad()
        reptile.outer_grad(x, y)
        opt.step()
        losses.append(adapted_query_loss())
    print(f"adapted query loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]
    other = pymeta.Reptile(mlp().double(), lr=0.02, steps=5)
    other.load_state_dict(reptile.state_dict())
    torch.testing.assert_close(other.episode(sx, sy, qx), reptile.episode(sx, sy, qx))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.5"):
        pymeta.Reptile(mlp(), lr=-0.5)
    with pytest.raises(ValueError, match=r"steps must be >= 0, got -1"):
        pymeta.Reptile(mlp(), lr=0.1, steps=-1)
    with pytest.raises(ValueError, match=r"outer_scale must be > 0, got 0"):
        pymeta.Reptile(mlp(), lr=0.1, outer_scale=0)
    reptile = pymeta.Reptile(mlp(out_features=3), lr=0.1, loss_fn=F.cross_entropy)
    with pytest.raises(TypeError, match=r"support_y must hold integer class labels"):
        reptile.outer_grad(torch.randn(2, 6, 1), torch.zeros(2, 6))
