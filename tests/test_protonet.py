"""ProtoNet: logits and their gradients equal the direct formula (explicit differences,
float64) for every metric, with and without BatchNorm in the encoder, for both BatchNorm
policies (support and query normalised jointly or separately) and every strategy."""

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_episode, cluster_episode, conv_bn, mlp, relative_error, run
from torch import nn

import pymeta
from pymeta.core.batched import STRATEGIES, strategy_pickers

CONCRETE_STRATEGIES = [s for s in STRATEGIES if s != "auto"]


def direct_logits(encoder: nn.Module, episode, metric: str, batch_stats: str = "joint") -> torch.Tensor:
    """Per task: embed support and query together (one BatchNorm batch) or in two separate
    calls (BatchNorm statistics of each), class means, explicit differences."""
    sx, sy, qx, _ = episode
    n_way = int(sy.max()) + 1
    params = dict(encoder.named_parameters())
    out = []
    for t in range(sx.shape[0]):
        if batch_stats == "joint":
            z = run(encoder, params, torch.cat([sx[t], qx[t]])).flatten(1)
            support, query = z[: sx.shape[1]], z[sx.shape[1] :]
        else:
            support, query = run(encoder, params, sx[t]).flatten(1), run(encoder, params, qx[t]).flatten(1)
        protos = torch.stack([support[sy[t] == c].mean(0) for c in range(n_way)])
        diff = query[:, None, :] - protos[None, :, :]
        if metric == "sqeuclidean":
            out.append(-(diff**2).sum(-1))
        elif metric == "euclidean":
            out.append(-(diff**2).sum(-1).sqrt())
        else:
            out.append((query[:, None, :] * protos[None]).sum(-1) / (query.norm(dim=-1)[:, None] * protos.norm(dim=-1)))
    return torch.stack(out)


ENCODERS = {
    "mlp": (lambda: mlp(8, 5), cluster_episode),
    "conv_bn": (lambda: conv_bn(n_way=6), lambda: classification_episode(ways=3, shots=3, queries=2)),
}


def assert_matches_direct(net, episode, logits, metric, batch_stats, label):
    """Assert ProtoNet's ``logits`` and their encoder gradients equal :func:`direct_logits`'s
    (float64, 1e-10), printing both errors under ``label`` first."""
    expected = direct_logits(net, episode, metric, batch_stats)
    qy = episode[3].flatten()
    grads = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), qy), list(net.parameters()))
    ref = torch.autograd.grad(F.cross_entropy(expected.flatten(0, 1), qy), list(net.parameters()))
    err = relative_error(grads, ref)
    print(f"{label}: max |logit err| {(logits - expected).abs().max().item():.3e}, grad rel err {err:.3e}")
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    assert err < 1e-10


@pytest.mark.parametrize("batch_stats", ["joint", "separate"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_logits_and_gradients_match_direct_formula(encoder, metric, batch_stats):
    make_encoder, make_episode = ENCODERS[encoder]
    net = make_encoder().double()
    episode = make_episode()
    sx, sy, qx, _ = episode
    before = {n: b.clone() for n, b in net.named_buffers()}
    logits = pymeta.ProtoNet(net, metric=metric, batch_stats=batch_stats).episode(sx, sy, qx)
    assert logits.shape == (sx.shape[0], qx.shape[1], int(sy.max()) + 1)
    assert_matches_direct(net, episode, logits, metric, batch_stats, f"{encoder} {metric} {batch_stats}")
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize("batch_stats", ["joint", "separate"])
@pytest.mark.parametrize("strategy", CONCRETE_STRATEGIES)
def test_every_strategy_gives_the_reference_logits_and_gradients(strategy, batch_stats):
    """With BatchNorm the encoder runs task-batched; each strategy equals the per-task
    reference (and so each other) in logits and in the gradients of the encoder."""
    net = conv_bn(n_way=6).double()
    episode = classification_episode(tasks=3, ways=3, shots=2, queries=3)
    sx, sy, qx, _ = episode
    protonet = pymeta.ProtoNet(net, metric="euclidean", batch_stats=batch_stats, strategy=strategy)
    assert protonet.strategy == strategy
    assert_matches_direct(net, episode, protonet.episode(sx, sy, qx), "euclidean", batch_stats,
                          f"{strategy} {batch_stats}")


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batch_stats_sets_which_examples_batch_norm_sees(strategy):
    """"joint": each BatchNorm call sees one task's S + Q examples; "separate": its S
    support examples, then its Q queries. With BatchNorm the two policies give different
    logits; without, the same."""
    sx, sy, qx, _ = classification_episode(tasks=2, ways=3, shots=2, queries=3)
    s, q = sx.shape[1], qx.shape[1]
    # vmap runs the encoder once per call for all tasks; the loop once per task (T = 2).
    expected = {
        ("vmap", "joint"): [s + q], ("vmap", "separate"): [s, q],
        ("loop", "joint"): [s + q, s + q], ("loop", "separate"): [s, s, q, q],
    }
    net = conv_bn(n_way=6).double()
    sizes = []
    net[1].register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    logits = {}
    for batch_stats in ("joint", "separate"):
        sizes.clear()
        logits[batch_stats] = pymeta.ProtoNet(net, batch_stats=batch_stats, strategy=strategy).episode(sx, sy, qx)
        assert sizes == expected[strategy, batch_stats], batch_stats
    gap = (logits["joint"] - logits["separate"]).abs().max().item()
    print(f"{strategy}: max |joint - separate| = {gap:.3e}")
    assert gap > 1e-3

    sx, sy, qx, _ = cluster_episode()
    no_bn = mlp(8, 5).double()
    joint = pymeta.ProtoNet(no_bn, batch_stats="joint", strategy=strategy).episode(sx, sy, qx)
    separate = pymeta.ProtoNet(no_bn, batch_stats="separate", strategy=strategy).episode(sx, sy, qx)
    torch.testing.assert_close(joint, separate, rtol=1e-12, atol=1e-12)


def test_auto_picks_a_strategy_that_checkpoints_record():
    """"auto" times the candidates on the first episodes, then keeps one; the picker is
    the ``_picker`` attribute that training checkpoints save and restore. Without
    BatchNorm there is nothing to pick: no picker, ``strategy`` is None."""
    net = conv_bn(n_way=6).double()
    sx, sy, qx, _ = classification_episode(tasks=2, ways=3, shots=1, queries=2)
    protonet = pymeta.ProtoNet(net, batch_stats="separate")
    assert protonet.strategy is None
    for _ in range(40):  # warm-up and up to 15 timed calls per candidate
        if protonet.strategy is not None:
            break
        protonet.episode(sx, sy, qx)
    assert protonet.strategy in CONCRETE_STRATEGIES
    assert strategy_pickers(protonet) == {"_picker": protonet._picker}
    no_bn = pymeta.ProtoNet(mlp(8, 5))
    assert no_bn.strategy is None and strategy_pickers(no_bn) == {}


def test_learns_and_state_dict_round_trips():
    protonet = pymeta.ProtoNet(mlp(8, 5).double())
    opt = torch.optim.Adam(protonet.parameters(), lr=1e-2)
    sx, sy, qx, qy = cluster_episode(tasks=4, ways=5, shots=2, queries=4, dim=8)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(protonet.episode(sx, sy, qx).flatten(0, 1), qy.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"query loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]
    other = pymeta.ProtoNet(mlp(8, 5).double())
    other.load_state_dict(protonet.state_dict())
    torch.testing.assert_close(other.episode(sx, sy, qx), protonet.episode(sx, sy, qx))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"metric must be one of \('sqeuclidean', 'euclidean', 'cosine'\), got 'l1'"):
        pymeta.ProtoNet(nn.Identity(), metric="l1")
    with pytest.raises(TypeError, match=r"encoder must be a torch\.nn\.Module"):
        pymeta.ProtoNet(lambda x: x)
    with pytest.raises(ValueError, match=r"batch_stats must be one of \('joint', 'separate'\), got 'both'"):
        pymeta.ProtoNet(nn.Identity(), batch_stats="both")
    with pytest.raises(ValueError, match=r"batch_stats must be one of \('joint', 'separate'\), got True"):
        pymeta.ProtoNet(nn.Identity(), batch_stats=True)
    for encoder in (nn.Identity(), conv_bn()):  # checked with and without BatchNorm
        with pytest.raises(ValueError, match=r"strategy must be one of .*, got 'fast'"):
            pymeta.ProtoNet(encoder, strategy="fast")
    with pytest.raises(TypeError):
        pymeta.ProtoNet(nn.Identity(), "euclidean", "separate")  # keyword-only
    protonet = pymeta.ProtoNet(nn.Identity())
    sx, qx = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    # n_way = max label + 1 = 3, but task 1 has no example of class 1.
    sy = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 2, 2, 2]])
    with pytest.raises(ValueError, match=r"class 1 has no example in task 1 of support_y"):
        protonet.episode(sx, sy, qx)
    with pytest.raises(ValueError, match=r"support_y must be in \[0, n_way\)"):
        protonet.episode(sx, sy - 1, qx)
    with pytest.raises(ValueError, match=r"support_y must hold at least 2 classes"):
        protonet.episode(sx, torch.zeros(2, 6, dtype=torch.long), qx)
    with pytest.raises(TypeError, match=r"support_y must hold integer class labels"):
        protonet.episode(sx, torch.zeros(2, 6), qx)
