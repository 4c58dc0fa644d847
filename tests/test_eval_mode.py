"""``train()`` / ``eval()`` mean what they mean in PyTorch, for every learner and strategy.

Eval mode: a BatchNorm layer that tracks running statistics normalises with them, so
``episode`` equals the module run per task (and learn2learn's ``clone()`` / ``adapt()``).
Train mode: per-task batch statistics, and running statistics are never written.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    conv_bn,
    per_task_sum,
    reference_meta_grads,
    relative_error,
    run,
)
from torch import nn

import pymeta

STRATEGIES = ["lowered", "vmap", "loop"]


def trained_stats(model: nn.Module) -> nn.Module:
    """``model`` (float64) with running statistics far from the batch statistics of
    ``classification_episode``'s inputs, so a wrong mode shows as a large error."""
    model = model.double()
    gen = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) * 3 + 0.2)
    return model


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers()}


def assert_buffers_equal(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, value in module.named_buffers():
        assert torch.equal(value, before[name]), f"{name} changed"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_maml_eval_with_zero_lr_is_the_eval_module(strategy):
    model = trained_stats(conv_bn()).eval()
    sx, sy, qx, _ = classification_episode()
    pred = pymeta.MAML(model, lr=0.0, strategy=strategy).episode(sx, sy, qx)
    expected = torch.stack([model(x) for x in qx])
    err = (pred - expected).abs().max().item()
    print(f"{strategy}: max abs error {err:.3e}")
    assert err < 1e-12


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_maml_meta_gradient_matches_reference_in_both_modes(strategy, mode):
    """The float64 per-task reference runs the module functionally in the same mode."""
    model = trained_stats(conv_bn())
    model.train(mode == "train")
    before = buffers(model)
    episode = classification_episode()
    sx, sy, qx, qy = episode
    maml = pymeta.MAML(model, lr=0.3, steps=2, strategy=strategy)
    pred = maml.episode(sx, sy, qx)
    grads = torch.autograd.grad(per_task_sum(F.cross_entropy, pred, qy), list(model.parameters()))
    expected = reference_meta_grads(model, episode, F.cross_entropy, 0.3, 2)
    err = relative_error(grads, expected)
    print(f"{mode} {strategy}: relative error {err:.3e}")
    assert err < 1e-10
    assert_buffers_equal(model, before)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_modes_differ_where_they_should(strategy):
    """The two modes are different functions on this model (the tests above can fail)."""
    model = trained_stats(conv_bn())
    sx, sy, qx, _ = classification_episode()
    maml = pymeta.MAML(model, lr=0.3, strategy=strategy)
    train_pred = maml.episode(sx, sy, qx)
    eval_pred = maml.eval().episode(sx, sy, qx)
    assert (train_pred - eval_pred).abs().max() > 0.1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_episode_agrees_with_clone_adapt_in_eval_mode(strategy):
    model = trained_stats(conv_bn()).eval()
    sx, sy, qx, _ = classification_episode()
    maml = pymeta.MAML(model, lr=0.3, strategy=strategy)
    pred = maml.episode(sx, sy, qx)
    for t in range(sx.shape[0]):
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
        torch.testing.assert_close(pred[t], learner(qx[t]), rtol=1e-10, atol=1e-12)


def test_track_running_stats_false_uses_batch_statistics_in_eval_mode():
    """PyTorch's rule: a layer without running statistics always uses the batch's."""
    model = conv_bn().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    sx, sy, qx, _ = classification_episode()
    train_pred = pymeta.MAML(model, lr=0.3, strategy="lowered").episode(sx, sy, qx)
    model.eval()
    for strategy in STRATEGIES:
        eval_pred = pymeta.MAML(model, lr=0.3, strategy=strategy).episode(sx, sy, qx)
        torch.testing.assert_close(eval_pred, train_pred, rtol=1e-10, atol=1e-12)


def encoder() -> nn.Module:
    """conv_bn without its head: ``[B, 1, 8, 8] -> [B, 16]`` embeddings."""
    return trained_stats(conv_bn())[:-1]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("batch_stats", ["joint", "separate"])
def test_protonet_eval_is_the_eval_encoder(strategy, batch_stats):
    enc = encoder().eval()
    sx, sy, qx, _ = classification_episode()
    net = pymeta.ProtoNet(enc, metric="euclidean", strategy=strategy, batch_stats=batch_stats)
    logits = net.episode(sx, sy, qx)
    for t in range(sx.shape[0]):
        support, query = enc(sx[t]), enc(qx[t])
        protos = torch.stack([support[sy[t] == c].mean(0) for c in range(4)])
        torch.testing.assert_close(logits[t], -torch.cdist(query, protos), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_anil_eval_uses_running_statistics(strategy):
    full = trained_stats(conv_bn())
    features, head = full[:-1].eval(), full[-1]
    episode = classification_episode()
    sx, sy, qx, qy = episode
    before = buffers(features)
    anil = pymeta.ANIL(features, head, lr=0.3, steps=2, strategy=strategy)
    pred = anil.episode(sx, sy, qx)
    grads = torch.autograd.grad(per_task_sum(F.cross_entropy, pred, qy), [*head.parameters(), *features.parameters()])
    expected = reference_meta_grads(head, episode, F.cross_entropy, 0.3, 2, features=features)
    err = relative_error(grads, expected)
    print(f"{strategy}: relative error {err:.3e}")
    assert err < 1e-10
    assert_buffers_equal(features, before)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_finetune_eval_embeds_with_running_statistics(strategy):
    enc = encoder().eval()
    sx, sy, qx, _ = classification_episode()
    ft = pymeta.FineTune(enc, n_way=4, lr=0.5, steps=3, base_classes=6, feature_dim=16, strategy=strategy)
    logits = ft.episode(sx, sy, qx)
    # Per task: the eval encoder's embeddings, then a zero head fitted by 3 SGD steps.
    for t in range(sx.shape[0]):
        support, query = enc(sx[t]), enc(qx[t])
        w = torch.zeros(4, 16, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        for _ in range(3):
            gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(support, w, b), sy[t]), [w, b])
            w, b = w - 0.5 * gw, b - 0.5 * gb
        torch.testing.assert_close(logits[t], F.linear(query, w, b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("learner", ["metasgd", "reptile"])
def test_other_maml_family_learners_follow_eval_mode(learner):
    model = trained_stats(conv_bn()).eval()
    sx, sy, qx, _ = classification_episode()
    before = buffers(model)
    algo = (pymeta.MetaSGD(model, lr=0.0, strategy="lowered") if learner == "metasgd"
            else pymeta.Reptile(model, lr=0.0, steps=2, strategy="lowered"))
    pred = algo.episode(sx, sy, qx)
    torch.testing.assert_close(pred, torch.stack([model(x) for x in qx]), rtol=1e-12, atol=1e-12)
    if learner == "reptile":
        algo.outer_grad(sx, sy)
    assert_buffers_equal(model, before)


def test_weights_match_run_helper_in_eval_mode():
    """The reference helper itself honours eval mode (so the references above test it)."""
    model = trained_stats(conv_bn()).eval()
    x = classification_episode()[0][0]
    torch.testing.assert_close(run(model, dict(model.named_parameters()), x), model(x))
