"""FineTune (Chen et al. 2019 "Baseline"): batched fine-tuning equals a float64 per-task
loop; pre-training is an ordinary supervised loop."""

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_episode, cluster_episode, conv_bn, mlp, reference_adapt, run
from torch import nn

import pymeta
from pymeta import models

ENCODERS = {
    # encoder, flattened feature size, episode
    "mlp": (lambda: mlp(8, 5), 5, cluster_episode),
    "conv_bn": (lambda: conv_bn(n_way=6), 6, lambda: classification_episode(ways=3, shots=3, queries=2)),
}


def reference_predictions(ft: pymeta.FineTune, episode, lr: float, steps: int) -> torch.Tensor:
    """Per task: zero head (and the encoder's weights), ``steps`` explicit SGD steps on the support."""
    sx, sy, qx, _ = episode
    head = nn.Linear(ft.feature_dim, ft.n_way)
    encoder = dict(ft.encoder.named_parameters())
    preds = []
    for t in range(sx.shape[0]):
        zero = {"weight": torch.zeros_like(head.weight, dtype=sx.dtype), "bias": torch.zeros_like(head.bias, dtype=sx.dtype)}
        zero = {n: w.requires_grad_() for n, w in zero.items()}
        if ft.finetune_encoder:
            net = nn.Sequential(ft.encoder, nn.Flatten(), head)
            weights = {**{f"0.{n}": p for n, p in encoder.items()}, **{f"2.{n}": w for n, w in zero.items()}}
            fast = reference_adapt(net, weights, sx[t], sy[t], F.cross_entropy, lr, steps, first_order=True)
            preds.append(run(net, fast, qx[t]))
        else:
            z = run(ft.encoder, encoder, torch.cat([sx[t], qx[t]])).flatten(1)
            fast = reference_adapt(head, zero, z[: sx.shape[1]], sy[t], F.cross_entropy, lr, steps, first_order=True)
            preds.append(run(head, fast, z[sx.shape[1] :]))
    return torch.stack(preds)


@pytest.mark.parametrize("strategy", ["lowered", "vmap", "loop"])
@pytest.mark.parametrize("finetune_encoder", [False, True])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_episode_matches_per_task_reference(encoder, finetune_encoder, strategy):
    make_encoder, dim, make_episode = ENCODERS[encoder]
    episode = make_episode()
    sx, sy, qx, _ = episode
    ft = pymeta.FineTune(
        make_encoder(), n_way=int(sy.max()) + 1, lr=0.5, steps=3, finetune_encoder=finetune_encoder,
        feature_dim=dim, base_classes=7, strategy=strategy,
    ).double()
    before = {n: t.clone() for n, t in ft.state_dict().items()}
    pred = ft.episode(sx, sy, qx)
    expected = reference_predictions(ft, episode, 0.5, 3)
    err = ((pred - expected).norm() / expected.norm()).item()
    print(f"{encoder} finetune_encoder={finetune_encoder} {strategy}: relative error {err:.3e}")
    assert err < 1e-10
    for name, value in ft.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(value, before[name]), name


def test_pretraining_loop_then_few_shot_episodes():
    torch.manual_seed(0)
    ft = pymeta.FineTune(mlp(8, 5), n_way=3, lr=1.0, steps=30, feature_dim=5, base_classes=6).double()
    centres = 2 * torch.randn(6, 8, dtype=torch.float64)
    opt = torch.optim.Adam(ft.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):  # an ordinary supervised loop over the base classes
        y = torch.randint(0, 6, (32,))
        x = centres[y] + 0.5 * torch.randn(32, 8, dtype=torch.float64)
        opt.zero_grad()
        loss = F.cross_entropy(ft(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"pre-training loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]
    # Novel tasks: the fine-tuned heads classify their queries; unfit (zero) heads cannot.
    sx, sy, qx, qy = cluster_episode(tasks=8)
    with torch.no_grad():
        accuracy = (ft.episode(sx, sy, qx).argmax(-1) == qy).double().mean().item()
        ft.steps = 0
        chance = (ft.episode(sx, sy, qx).argmax(-1) == qy).double().mean().item()
    print(f"query accuracy {accuracy:.3f} (no fine-tuning: {chance:.3f})")
    assert accuracy > 0.8 and chance < 0.5


def test_defaults_and_state_dict_holds_encoder_and_classifier_only():
    ft = pymeta.FineTune(mlp(8, 5), n_way=3, lr=0.1, feature_dim=5, base_classes=6)
    assert {k.split(".")[0] for k in ft.state_dict()} == {"encoder", "classifier"}
    assert ft.classifier.out_features == 6 and ft.steps == 100
    # pymeta's backbones announce their width.
    assert pymeta.FineTune(models.mlp(8, (16,), 5), n_way=3, lr=0.1, base_classes=6).feature_dim == 5
    other = pymeta.FineTune(mlp(8, 5), n_way=3, lr=0.1, feature_dim=5, base_classes=6)
    other.load_state_dict(ft.state_dict())
    sx, sy, qx, _ = cluster_episode(dim=8)
    sx, qx = sx.float(), qx.float()
    torch.testing.assert_close(other.episode(sx, sy, qx), ft.episode(sx, sy, qx))


def test_bad_arguments():
    def make(**kwargs):
        args = dict(n_way=3, lr=0.1, steps=5, feature_dim=5, base_classes=6) | kwargs
        return pymeta.FineTune(mlp(8, 5), **args)

    with pytest.raises(ValueError, match=r"n_way must be >= 2, got 1"):
        make(n_way=1)
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.1"):
        make(lr=-0.1)
    with pytest.raises(ValueError, match=r"steps must be >= 0, got -3"):
        make(steps=-3)
    with pytest.raises(ValueError, match=r"feature_dim must be >= 1, got 0"):
        make(feature_dim=0)
    with pytest.raises(TypeError, match=r"base_classes must be an int, got float"):
        make(base_classes=6.0)
    with pytest.raises(ValueError, match=r"feature_dim is required: the encoder has no out_features"):
        pymeta.FineTune(mlp(8, 5), n_way=3, lr=0.1, base_classes=6)
    sx, sy, qx, _ = cluster_episode(ways=4)
    with pytest.raises(ValueError, match=r"support_y must be in \[0, n_way\) = \[0, 3\), got support_y\[0, 12\] = 3"):
        make().double().episode(sx, sy, qx)
