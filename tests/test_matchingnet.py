"""MatchingNet: log-probabilities and the gradients of every parameter equal easyfsl's
per-task ``MatchingNetworks`` (as an oracle when installed, and a peer-free per-task
reference written the same way), with and without full context embeddings; errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    conv_maps,
    easyfsl_methods,
    parameter_grads,
    relative_error,
    run,
    with_running_stats,
)
from torch import nn

import pymeta
from pymeta.core.batched import STRATEGIES

D = 32  # conv_maps(2) on 8x8 inputs, flattened
CONCRETE_STRATEGIES = [s for s in STRATEGIES if s != "auto"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def encoder() -> nn.Module:
    return nn.Sequential(conv_maps(2), nn.Flatten())


def build(dtype: torch.dtype, mode: str, fce: bool = True, **kwargs) -> pymeta.MatchingNet:
    net = with_running_stats(pymeta.MatchingNet(encoder(), D, fce=fce, **kwargs).to(dtype))
    return net.train(mode == "train")


def episode(dtype: torch.dtype, tasks: int = 3, shots: int = 2) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(dtype) if x.is_floating_point() else x
                 for x in classification_episode(tasks=tasks, ways=3, shots=shots, queries=3))


def reference_log_probs(net: pymeta.MatchingNet, ep, batch_stats: str = "separate") -> torch.Tensor:
    """easyfsl's MatchingNetworks, one task at a time (its process_support_set, forward,
    encode_support_features and encode_query_features, with the same modules)."""
    sx, sy, qx, _ = ep
    enc, params = net.encoder, dict(net.encoder.named_parameters())
    out = []
    for t in range(sx.shape[0]):
        if batch_stats == "separate":
            s, q = run(enc, params, sx[t]), run(enc, params, qx[t])
        else:
            z = run(enc, params, torch.cat([sx[t], qx[t]]))
            s, q = z[: sx.shape[1]], z[sx.shape[1]:]
        if net.fce:
            states = net.support_encoder(s.unsqueeze(0))[0].squeeze(0)
            s = s + states[:, :D] + states[:, D:]
            h, c = q, torch.zeros_like(q)
            for _ in range(len(s)):
                read = torch.softmax(h.mm(s.T), dim=1).mm(s)
                h, c = net.query_encoder(torch.cat((q, read), 1), (h, c))
                h = h + q
            q = h
        one_hot = F.one_hot(sy[t]).to(s.dtype)
        out.append((torch.softmax(q.mm(F.normalize(s).T), dim=1).mm(one_hot) + 1e-6).log())
    return torch.stack(out)


def per_task_nll(log_probs: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
    return sum(F.nll_loss(lp, y) for lp, y in zip(log_probs, qy, strict=True))


def assert_same(label, net, ep, log_probs, expected, tol) -> None:
    qy = ep[3]
    grads = parameter_grads(per_task_nll(log_probs, qy), net)
    expected_grads = parameter_grads(per_task_nll(expected, qy), net)
    value_err = ((log_probs - expected).norm() / expected.norm()).item()
    grad_err = relative_error(list(grads.values()), [expected_grads[n] for n in grads])
    print(f"{label}: log-prob rel err {value_err:.2e}, gradient rel err {grad_err:.2e}")
    assert log_probs.shape == expected.shape and value_err < tol and grad_err < tol
    scale = max(g.abs().max().item() for g in expected_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("fce", [True, False])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_per_task_reference(fce, mode, dtype):
    """Eval mode, and train mode with batch_stats="separate" (easyfsl's setting)."""
    net = build(dtype, mode, fce, batch_stats="separate", strategy="loop")
    ep = episode(dtype)
    log_probs = net.episode(*ep[:3])
    assert_same(f"fce={fce} {mode} {dtype}", net, ep, log_probs, reference_log_probs(net, ep), TOL[dtype])


@pytest.mark.parametrize("strategy", CONCRETE_STRATEGIES)
def test_every_strategy_and_joint_batch_stats(strategy):
    net = build(torch.float64, "train", batch_stats="joint", strategy=strategy)
    ep = episode(torch.float64, shots=3)
    assert_same(f"{strategy} joint", net, ep, net.episode(*ep[:3]), reference_log_probs(net, ep, "joint"), 1e-10)
    assert net.strategy == strategy


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_matches_easyfsl(mode):
    """easyfsl's MatchingNetworks with our modules handed over (float32 only: it builds its
    one-hot labels in float32, so float64 features fail in its matmul)."""
    methods = easyfsl_methods()
    net = build(torch.float32, mode, batch_stats="separate", strategy="loop")
    peer = methods.MatchingNetworks(copy.deepcopy(net.encoder), feature_dimension=D,
                                    support_encoder=copy.deepcopy(net.support_encoder),
                                    query_encoder=copy.deepcopy(net.query_encoder)).train(mode == "train")
    ep = episode(torch.float32)
    sx, sy, qx, qy = ep
    expected = []
    for t in range(sx.shape[0]):
        peer.process_support_set(sx[t], sy[t])
        expected.append(peer(qx[t]))
    expected = torch.stack(expected)
    ours = dict(net.named_parameters())
    theirs = parameter_grads(per_task_nll(expected, qy), peer)
    # easyfsl names: backbone., support_features_encoder., query_features_encoding_cell.
    renamed = {n.replace("backbone.", "encoder.").replace("support_features_encoder.", "support_encoder.")
               .replace("query_features_encoding_cell.", "query_encoder."): g for n, g in theirs.items()}
    assert renamed.keys() == ours.keys()
    log_probs = net.episode(sx, sy, qx)
    grads = parameter_grads(per_task_nll(log_probs, qy), net)
    value_err = ((log_probs - expected).norm() / expected.norm()).item()
    grad_err = relative_error(list(grads.values()), [renamed[n] for n in grads])
    print(f"easyfsl {mode}: log-prob rel err {value_err:.2e}, gradient rel err {grad_err:.2e}")
    assert value_err < 1e-5 and grad_err < 1e-5


def test_default_lstms_are_easyfsls():
    easyfsl_methods()
    from easyfsl.modules.predesigned_modules import (
        default_matching_networks_query_encoder,
        default_matching_networks_support_encoder,
    )

    net = pymeta.MatchingNet(encoder(), D)
    assert str(net.support_encoder) == str(default_matching_networks_support_encoder(D))
    assert str(net.query_encoder) == str(default_matching_networks_query_encoder(D))


def test_errors_name_the_module_and_shapes():
    sx, sy, qx, _ = episode(torch.float64)
    with pytest.raises(ValueError, match=r"encoder \(Sequential\) returned 32 features per example, but feature_dim "
                                         r"is 16: got shape \(6, 32\)"):
        pymeta.MatchingNet(encoder(), 16, fce=False).double().episode(sx, sy, qx)
    gru = nn.GRU(D, D, batch_first=True, bidirectional=True)
    with pytest.raises(ValueError, match=r"support_encoder must be nn.LSTM\(32, 32, batch_first=True, "
                                         r"bidirectional=True\) for fce=True .* got GRU\(32, 32"):
        pymeta.MatchingNet(encoder(), D, support_encoder=gru)
    with pytest.raises(ValueError, match=r"support_encoder must be nn.LSTM.*got LSTM\(32, 16, batch_first=True"):
        pymeta.MatchingNet(encoder(), D, support_encoder=nn.LSTM(D, 16, batch_first=True, bidirectional=True))
    with pytest.raises(ValueError, match=r"query_encoder must be nn.LSTMCell\(64, 32\) for fce=True, got LSTMCell\(32, 32\)"):
        pymeta.MatchingNet(encoder(), D, query_encoder=nn.LSTMCell(D, D))
    with pytest.raises(ValueError, match=r"pass them with fce=True, or neither with fce=False"):
        pymeta.MatchingNet(encoder(), D, query_encoder=nn.LSTMCell(2 * D, D), fce=False)
    net = pymeta.MatchingNet(encoder(), D).double()
    net.support_encoder = gru.double()  # reassigned after construction: caught at the episode
    with pytest.raises(ValueError, match=r"support_encoder must be nn.LSTM.* got GRU"):
        net.episode(sx, sy, qx)
    with pytest.raises(TypeError, match=r"fce must be a bool, got str 'yes'"):
        pymeta.MatchingNet(encoder(), D, fce="yes")
