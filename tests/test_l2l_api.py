"""The learn2learn-compatible API: clone() / adapt(loss) with learn2learn's semantics."""

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, reference_meta_grads, regression_episode, relative_error
from torch import nn

import pymeta


def l2l_meta_grads(maml: pymeta.MAML, episode, steps: int) -> list[torch.Tensor]:
    """The canonical learn2learn training loop, one task at a time."""
    sx, sy, qx, qy = episode
    meta_loss = 0.0
    for t in range(sx.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.mse_loss(learner(sx[t]), sy[t]))
        meta_loss = meta_loss + F.mse_loss(learner(qx[t]), qy[t])
    return list(torch.autograd.grad(meta_loss, list(maml.module.parameters())))


def test_clone_equals_model_and_calls_run_the_model():
    model = mlp().double()
    maml = pymeta.MAML(model, lr=0.1)
    x = torch.randn(5, 1, dtype=torch.float64)
    torch.testing.assert_close(maml(x), model(x))
    torch.testing.assert_close(maml.clone()(x), model(x))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_clone_adapt_meta_gradient_matches_reference(first_order, steps):
    model = mlp().double()
    episode = regression_episode()
    maml = pymeta.MAML(model, lr=0.05, first_order=first_order)
    grads = l2l_meta_grads(maml, episode, steps)
    expected = reference_meta_grads(model, episode, F.mse_loss, 0.05, steps, first_order=first_order)
    err = relative_error(grads, expected)
    print(f"steps={steps} first_order={first_order}: relative error {err:.3e}")
    assert err < 1e-10


def test_first_order_differs_from_second_order():
    episode = regression_episode()
    model = mlp().double()
    second = l2l_meta_grads(pymeta.MAML(model, lr=0.3), episode, 2)
    first = l2l_meta_grads(pymeta.MAML(model, lr=0.3, first_order=True), episode, 2)
    assert relative_error(first, second) > 1e-3


def test_adapt_lowers_the_loss_and_leaves_the_model_unchanged():
    model = mlp().double()
    before = [p.clone() for p in model.parameters()]
    sx, sy, _, _ = regression_episode()
    learner = pymeta.MAML(model, lr=0.05).clone()
    losses = []
    for _ in range(5):
        loss = F.mse_loss(learner(sx[0]), sy[0])
        losses.append(loss.item())
        learner.adapt(loss)
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # A clone's parameters are its adapted weights, named as learn2learn names them.
    names = [n for n, _ in learner.named_parameters()]
    assert names == [f"module.{n}" for n, _ in model.named_parameters()]
    assert not any(p is q for p, q in zip(learner.parameters(), model.parameters(), strict=True))


def test_gradients_reach_the_original_parameters_and_optimizer_steps():
    model = mlp().double()
    maml = pymeta.MAML(model, lr=0.05)
    opt = torch.optim.SGD(maml.parameters(), lr=0.01)
    sx, sy, qx, qy = regression_episode()
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(sx[0]), sy[0]))
    F.mse_loss(learner(qx[0]), qy[0]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    before = [p.clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_clone_of_a_clone_continues_from_the_adapted_weights():
    model = mlp().double()
    sx, sy, qx, _ = regression_episode()
    learner = pymeta.MAML(model, lr=0.05).clone()
    learner.adapt(F.mse_loss(learner(sx[0]), sy[0]))
    torch.testing.assert_close(learner.clone()(qx[0]), learner(qx[0]))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1, 8)
        self.used = nn.Linear(8, 1)
        self.unused = nn.Linear(8, 1)

    def forward(self, x):
        return self.used(torch.tanh(self.body(x)))


def test_unused_parameters_raise_unless_allowed():
    x, y = torch.randn(4, 1), torch.randn(4, 1)
    learner = pymeta.MAML(TwoHeads(), lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"unused\.weight.*allow_unused=True"):
        learner.adapt(F.mse_loss(learner(x), y))
    learner = pymeta.MAML(TwoHeads(), lr=0.1, allow_unused=True).clone()
    before = dict(learner.named_parameters())
    learner.adapt(F.mse_loss(learner(x), y))
    after = dict(learner.named_parameters())
    assert after["module.unused.weight"] is before["module.unused.weight"]
    assert not torch.equal(after["module.used.weight"], before["module.used.weight"])
    # The per-call flag overrides the module's, as in learn2learn.
    strict = pymeta.MAML(TwoHeads(), lr=0.1).clone()
    strict.adapt(F.mse_loss(strict(x), y), allow_unused=True)


def test_nograd_parameters_raise_unless_allowed():
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 1), torch.randn(4, 1)
    learner = pymeta.MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"0\.weight.*allow_nograd=True"):
        learner.adapt(F.mse_loss(learner(x), y))
    learner = pymeta.MAML(model, lr=0.1, allow_nograd=True).clone()
    learner.adapt(F.mse_loss(learner(x), y))
    weights = dict(learner.named_parameters())
    assert weights["module.0.weight"] is model[0].weight
    assert not torch.equal(weights["module.0.bias"], model[0].bias)


def test_adapt_rejects_a_loss_without_graph_or_not_scalar():
    learner = pymeta.MAML(mlp(), lr=0.1).clone()
    x = torch.randn(4, 1)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        learner.adapt(learner(x).sum(1))
    with torch.no_grad():
        loss = learner(x).sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        learner.adapt(loss)
