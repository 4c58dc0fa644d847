"""ANIL: the head adapts on features computed once; meta-gradients of features and head
equal a float64 per-task reference."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    mlp,
    per_task_sum,
    reference_meta_grads,
    regression_episode,
    relative_error,
)
from torch import nn

import pymeta
from pymeta.core.batched import strategy_pickers


def conv_bn_features() -> nn.Module:
    """Conv features with BatchNorm: each task is normalised over its support and query."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )


CASES = {
    # features, head, episode, loss, lr
    "mlp": (lambda: mlp(1, 16), lambda: nn.Linear(16, 1), regression_episode, F.mse_loss, 0.1),
    "conv_bn": (conv_bn_features, lambda: nn.Linear(16, 4), classification_episode, F.cross_entropy, 0.5),
}


def build(case: str, **kwargs) -> tuple[pymeta.ANIL, tuple[torch.Tensor, ...]]:
    make_features, make_head, make_episode, loss_fn, lr = CASES[case]
    anil = pymeta.ANIL(make_features(), make_head(), lr=lr, loss_fn=loss_fn, **kwargs).double()
    return anil, make_episode()


@pytest.mark.parametrize("strategy", ["lowered", "vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_per_task_reference(case, steps, strategy, first_order):
    anil, episode = build(case, steps=steps, first_order=first_order, strategy=strategy)
    sx, sy, qx, qy = episode
    loss_fn, lr = CASES[case][3], CASES[case][4]
    pred = anil.episode(sx, sy, qx)
    head, features = anil.head.module, anil.features
    grads = torch.autograd.grad(per_task_sum(loss_fn, pred, qy), [*head.parameters(), *features.parameters()])
    expected = reference_meta_grads(head, episode, loss_fn, lr, steps, first_order, features=features)
    err = relative_error(grads, expected)
    feature_err = relative_error(grads[2:], expected[2:])
    print(f"{case} steps={steps} {strategy} first_order={first_order}: rel err {err:.3e}, features {feature_err:.3e}")
    assert err < 1e-10 and feature_err < 1e-10


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_features_run_once_per_episode_and_running_stats_untouched(case, strategy):
    """Features are computed once per episode (not per inner step) on each task's support
    and query together: one call on all tasks' examples without BatchNorm, with BatchNorm
    one vmapped call or one call per task (the "loop" strategy)."""
    anil, (sx, sy, qx, _) = build(case, steps=3, strategy=strategy)
    calls = []
    anil.features.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    before = {n: b.clone() for n, b in anil.features.named_buffers()}
    anil.episode(sx, sy, qx)
    tasks, examples = sx.shape[0], sx.shape[1] + qx.shape[1]
    if case == "mlp":
        assert calls == [tasks * examples]
    else:
        assert calls == ([examples] if strategy == "vmap" else [examples] * tasks)
    for name, buffer in anil.features.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_strategy_pickers_of_head_and_features_are_checkpointed():
    """"auto" picks the head's inner-loop strategy and, with BatchNorm in the features,
    the embedding's, separately; training checkpoints record both pickers by name."""
    anil, (sx, sy, qx, _) = build("conv_bn")
    pickers = strategy_pickers(anil)
    assert pickers == {"head._picker": anil.head._picker, "_embed_picker": anil._embed_picker}
    for _ in range(40):  # warm-up and up to 15 timed calls per candidate
        if all(p.chosen is not None for p in pickers.values()):
            break
        anil.episode(sx, sy, qx)
    assert all(p.chosen in ("lowered", "vmap", "loop") for p in pickers.values())
    assert set(strategy_pickers(build("mlp")[0])) == {"head._picker"}  # no BatchNorm: no choice


def test_learns_and_state_dict_round_trips():
    anil, (sx, sy, qx, qy) = build("conv_bn", steps=1)
    opt = torch.optim.Adam(anil.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(anil.episode(sx, sy, qx).flatten(0, 1), qy.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"meta-loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]
    other, _ = build("conv_bn", steps=1)
    other.load_state_dict(anil.state_dict())
    torch.testing.assert_close(other.episode(sx, sy, qx), anil.episode(sx, sy, qx))
    # learn2learn's layout: features.*, head.module.* (the head is a MAML).
    assert all(k.startswith(("features.", "head.module.")) for k in anil.state_dict())


def test_steps_setting_and_zero_steps_is_the_unadapted_network():
    anil, (sx, sy, qx, _) = build("mlp", steps=2)
    anil.steps = 0
    torch.testing.assert_close(anil.episode(sx, sy, qx), torch.stack([anil(x) for x in qx]))
    with pytest.raises(ValueError, match=r"steps must be >= 0, got -1"):
        anil.steps = -1


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1\.0"):
        pymeta.ANIL(nn.Identity(), nn.Linear(1, 1), lr=-1.0)
    with pytest.raises(ValueError, match=r"steps must be >= 0, got -2"):
        pymeta.ANIL(nn.Identity(), nn.Linear(1, 1), lr=0.1, steps=-2)
    with pytest.raises(TypeError, match=r"features must be a torch\.nn\.Module, got function"):
        pymeta.ANIL(lambda x: x, nn.Linear(1, 1), lr=0.1)
    with pytest.raises(TypeError, match=r"head must be a torch\.nn\.Module, got function"):
        pymeta.ANIL(nn.Identity(), lambda x: x, lr=0.1)
    anil = pymeta.ANIL(nn.Identity(), nn.Linear(1, 1), lr=0.1)
    with pytest.raises(ValueError, match=r"same example shape"):
        anil.episode(torch.randn(2, 5, 1), torch.randn(2, 5, 1), torch.randn(2, 4, 2))
