"""ProtoNet: logits and their gradients equal the direct formula (explicit differences,
float64) for every metric, with and without BatchNorm in the encoder."""

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_episode, cluster_episode, conv_bn, mlp, relative_error, run
from torch import nn

import pymeta


def direct_logits(encoder: nn.Module, episode, metric: str) -> torch.Tensor:
    """Per task: embed support and query together, class means, explicit differences."""
    sx, sy, qx, _ = episode
    n_way = int(sy.max()) + 1
    params = dict(encoder.named_parameters())
    out = []
    for t in range(sx.shape[0]):
        z = run(encoder, params, torch.cat([sx[t], qx[t]])).flatten(1)
        support, query = z[: sx.shape[1]], z[sx.shape[1] :]
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


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_logits_and_gradients_match_direct_formula(encoder, metric):
    make_encoder, make_episode = ENCODERS[encoder]
    net = make_encoder().double()
    episode = make_episode()
    sx, sy, qx, qy = episode
    before = {n: b.clone() for n, b in net.named_buffers()}
    logits = pymeta.ProtoNet(net, metric=metric).episode(sx, sy, qx)
    expected = direct_logits(net, episode, metric)
    assert logits.shape == (sx.shape[0], qx.shape[1], int(sy.max()) + 1)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), qy.flatten()), list(net.parameters()))
    ref = torch.autograd.grad(F.cross_entropy(expected.flatten(0, 1), qy.flatten()), list(net.parameters()))
    err = relative_error(grads, ref)
    print(f"{encoder} {metric}: max |logit err| {(logits - expected).abs().max().item():.3e}, grad rel err {err:.3e}")
    assert err < 1e-10
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, before[name]), name


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
