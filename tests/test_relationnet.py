"""RelationNet: scores and the gradients of every parameter equal easyfsl's per-task
``RelationNetworks`` (as an oracle when installed, and a peer-free per-task reference
written the same way), on the fused and the general path; memory; errors."""

from __future__ import annotations

import copy

import pytest
import torch
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
from pymeta.algorithms.relationnet import default_relation_module, relation_mse_loss
from pymeta.core.batched import STRATEGIES

C = 4  # channels of conv_maps()
CONCRETE_STRATEGIES = [s for s in STRATEGIES if s != "auto"]
# Tolerances of the issue: values and gradients, relative, per dtype.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def unfusable(relation: nn.Module) -> nn.Module:
    """The same function, but not starting with Conv2d + BatchNorm2d + ReLU: the general path."""
    return nn.Sequential(nn.Identity(), relation)


def build(path: str, dtype: torch.dtype, mode: str, **kwargs) -> pymeta.RelationNet:
    relation = default_relation_module(C)
    net = pymeta.RelationNet(conv_maps(C), C, relation if path == "fused" else unfusable(relation), **kwargs)
    net = with_running_stats(net.to(dtype))
    return net.train(mode == "train")


def episode(dtype: torch.dtype, tasks: int = 3) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(dtype) if x.is_floating_point() else x
                 for x in classification_episode(tasks=tasks, ways=3, shots=2, queries=3))


def reference_scores(net: pymeta.RelationNet, ep, batch_stats: str = "separate") -> torch.Tensor:
    """easyfsl's RelationNetworks, one task at a time: embed (support and queries
    separately, or together), class means, the [Q * N, 2C, H, W] pairs (prototype first),
    the relation module on them."""
    sx, sy, qx, _ = ep
    n_way = int(sy.max()) + 1
    enc, rel = net.encoder, net.relation_module
    out = []
    for t in range(sx.shape[0]):
        if batch_stats == "separate":
            s, q = run(enc, dict(enc.named_parameters()), sx[t]), run(enc, dict(enc.named_parameters()), qx[t])
        else:
            z = run(enc, dict(enc.named_parameters()), torch.cat([sx[t], qx[t]]))
            s, q = z[: sx.shape[1]], z[sx.shape[1]:]
        protos = torch.stack([s[sy[t] == c].mean(0) for c in range(n_way)])
        if net.prototype == "sum":
            protos = protos * torch.bincount(sy[t]).to(protos.dtype)[:, None, None, None]
        pairs = torch.cat((protos.unsqueeze(0).expand(q.shape[0], -1, -1, -1, -1),
                           q.unsqueeze(1).expand(-1, n_way, -1, -1, -1)), dim=2).view(-1, 2 * C, *q.shape[2:])
        out.append(run(rel, dict(rel.named_parameters()), pairs).view(-1, n_way))
    return torch.stack(out)


def assert_same(label: str, scores, expected, grads, expected_grads, tol: float) -> None:
    value_err = ((scores - expected).norm() / expected.norm()).item()
    grad_err = relative_error(list(grads.values()), [expected_grads[n] for n in grads])
    print(f"{label}: scores rel err {value_err:.2e}, gradient rel err {grad_err:.2e}")
    assert scores.shape == expected.shape
    assert value_err < tol and grad_err < tol
    # Every parameter; absolute error on the scale of all gradients, since some are 0 up to
    # rounding (the bias of a convolution followed by train-mode BatchNorm).
    scale = max(g.abs().max().item() for g in expected_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=tol, atol=tol * scale, msg=name)


def per_task_loss(scores: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
    return sum(relation_mse_loss(s, y) for s, y in zip(scores, qy, strict=True))


@pytest.mark.parametrize("path", ["fused", "general"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_per_task_reference(path, mode, dtype):
    """Eval mode, and train mode with batch_stats="separate" (easyfsl's setting)."""
    net = build(path, dtype, mode, batch_stats="separate", strategy="loop")
    assert net.fused == (path == "fused")
    ep = episode(dtype)
    before = {n: b.clone() for n, b in net.named_buffers()}
    scores = net.episode(*ep[:3])
    expected = reference_scores(net, ep)
    grads = parameter_grads(per_task_loss(scores, ep[3]), net)
    assert_same(f"{path} {mode} {dtype}", scores, expected, grads,
                parameter_grads(per_task_loss(expected, ep[3]), net), TOL[dtype])
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, before[name]), f"{name} changed"


@pytest.mark.parametrize("strategy", CONCRETE_STRATEGIES)
def test_every_strategy_and_joint_batch_stats(strategy):
    """Each strategy gives the per-task reference, with "joint" BatchNorm batches and the
    paper's summed prototypes (3 shots per class: the sum differs from the mean)."""
    net = build("fused", torch.float64, "train", batch_stats="joint", strategy=strategy, prototype="sum")
    ep = tuple(x.double() if x.is_floating_point() else x
               for x in classification_episode(tasks=3, ways=3, shots=3, queries=2))
    scores = net.episode(*ep[:3])
    expected = reference_scores(net, ep, "joint")
    grads = parameter_grads(per_task_loss(scores, ep[3]), net)
    assert_same(f"{strategy} joint sum", scores, expected, grads,
                parameter_grads(per_task_loss(expected, ep[3]), net), 1e-10)
    assert net.strategy == strategy and net._head_picker.chosen == strategy


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_easyfsl(mode, dtype):
    """easyfsl's RelationNetworks built from the same modules (deep copies: its train-mode
    forward overwrites BatchNorm running statistics), task by task."""
    methods = easyfsl_methods()
    net = build("fused", dtype, mode, batch_stats="separate", strategy="loop")
    ep = episode(dtype)
    sx, sy, qx, qy = ep
    peer = methods.RelationNetworks(copy.deepcopy(net.encoder), feature_dimension=C,
                                    relation_module=copy.deepcopy(net.relation_module)).train(mode == "train")
    expected = []
    for t in range(sx.shape[0]):
        peer.process_support_set(sx[t], sy[t])
        expected.append(peer(qx[t]))
    expected = torch.stack(expected)
    peer_loss = sum(torch.nn.functional.mse_loss(s, torch.nn.functional.one_hot(y, 3).to(dtype))
                    for s, y in zip(expected, qy, strict=True))
    peer_grads = dict(zip([n for n, _ in net.named_parameters()], parameter_grads(peer_loss, peer).values(),
                          strict=True))
    scores = net.episode(sx, sy, qx)
    assert_same(f"easyfsl {mode} {dtype}", scores, expected.detach(), parameter_grads(per_task_loss(scores, qy), net),
                peer_grads, TOL[dtype])


@pytest.mark.parametrize("path", ["fused", "general"])
@pytest.mark.parametrize("strategy", CONCRETE_STRATEGIES)
def test_relation_batch_norm_sees_one_task_only(path, strategy):
    """Train mode: task 0's scores do not move when the other tasks' inputs change, and
    equal task 0 run alone."""
    net = build(path, torch.float64, "train", batch_stats="separate", strategy=strategy)
    sx, sy, qx, _ = episode(torch.float64)
    before = net.episode(sx, sy, qx)
    sx2, qx2 = sx.clone(), qx.clone()
    sx2[1:] = 3 * sx2[1:] + 1
    qx2[1:] = -2 * qx2[1:]
    after = net.episode(sx2, sy, qx2)
    alone = net.episode(sx[:1], sy[:1], qx[:1])
    torch.testing.assert_close(after[0], before[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(alone[0], before[0], rtol=1e-13, atol=1e-13)
    assert (after[1:] - before[1:]).abs().max() > 1e-3


class _Saved:
    """Bytes autograd holds for backward while a function runs: the live total and its peak."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> tuple:
        size = t.numel() * t.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return t, size

    def unpack(self, packed: tuple) -> torch.Tensor:
        return packed[0]


def episode_memory(net: pymeta.RelationNet, ep) -> tuple[int, int]:
    """``(peak bytes saved for backward, largest tensor any op produced)`` of one episode's
    forward, counted with saved-tensor hooks and a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    saved = _Saved()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), Largest():
        net.episode(*ep[:3])
    return saved.peak, Largest.numel


def test_peak_memory_does_not_grow_with_the_pairs():
    """Nothing of size Q * N * 2C * H * W: with a 2-channel first conv after 16-channel
    maps, the whole episode (a small encoder included) saves less than half the pair
    tensor and no op makes a tensor a quarter its size; the general path saves the pairs."""
    channels, tasks, side = 16, 2, 4
    relation = nn.Sequential(nn.Conv2d(2 * channels, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                             nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2, 1), nn.Sigmoid())
    # Q = 30, N = 5: 150 pairs a task for 35 examples, as in a 5-way episode with 6 queries a class.
    sx, sy, qx, qy = classification_episode(tasks=tasks, ways=5, shots=1, queries=6)
    ep = (torch.randn(*sx.shape[:2], channels, side, side, dtype=torch.float64), sy,
          torch.randn(*qx.shape[:2], channels, side, side, dtype=torch.float64), qy)
    pairs_numel = tasks * 30 * 5 * 2 * channels * side * side
    pairs_bytes = pairs_numel * 8
    memory = {}
    for path, module in (("fused", relation), ("general", unfusable(relation))):
        encoder = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
        net = pymeta.RelationNet(encoder, channels, module, strategy="loop").double()
        memory[path] = episode_memory(net, ep)
        print(f"{path}: saved peak {memory[path][0]} B, largest tensor {memory[path][1]} elements; "
              f"pairs {pairs_bytes} B, {pairs_numel} elements")
    assert memory["fused"][0] < 0.5 * pairs_bytes and memory["fused"][1] < pairs_numel / 4
    assert memory["general"][0] > pairs_bytes and memory["general"][1] >= pairs_numel


def test_default_relation_module_is_easyfsls():
    methods = easyfsl_methods()
    from easyfsl.modules.predesigned_modules import default_relation_module as theirs

    ours = default_relation_module(6)
    assert str(ours) == str(theirs(6))
    assert methods.RelationNetworks(nn.Identity(), feature_dimension=6).relation_module.state_dict().keys() == \
        ours.state_dict().keys()


def test_errors_name_the_module_and_shapes():
    sx, sy, qx, _ = episode(torch.float64)
    flat = pymeta.RelationNet(nn.Sequential(conv_maps(C), nn.Flatten()), C).double()
    with pytest.raises(ValueError, match=r"encoder \(Sequential\) must return \[B, C, H, W\] \(no flatten\), "
                                         r"got shape \(6, 64\)"):
        flat.episode(sx, sy, qx)
    wrong_c = pymeta.RelationNet(conv_maps(C), 8, relation_module=default_relation_module(8)).double()
    with pytest.raises(ValueError, match=r"encoder \(Sequential\) returned maps of 4 channels, but feature_dim is 8: "
                                         r"got shape \(6, 4, 4, 4\)"):
        wrong_c.episode(sx, sy, qx)
    two_scores = nn.Sequential(nn.Conv2d(2 * C, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"relation_module \(Sequential\) must return one score per pair, \[P\] or "
                                         r"\[P, 1\] for P = Q \* N = 9 \* 3 pairs, got shape \(27, 2\)"):
        pymeta.RelationNet(conv_maps(C).double(), C, two_scores.double()).episode(sx, sy, qx)
    with pytest.raises(ValueError, match=r"must take the 2 \* feature_dim = 8 channels .* got in_channels=4"):
        pymeta.RelationNet(conv_maps(C), C, nn.Sequential(nn.Conv2d(4, 1, 3)))
    for kwargs, match in (({"prototype": "median"}, r"prototype must be one of \('mean', 'sum'\), got 'median'"),
                          ({"loss": "l1"}, r"loss must be one of \('mse', 'cross_entropy'\), got 'l1'"),
                          ({"batch_stats": "both"}, r"batch_stats must be one of"),
                          ({"n_way": 1}, r"n_way must be >= 2")):
        with pytest.raises(ValueError, match=match):
            pymeta.RelationNet(conv_maps(C), C, **kwargs)
    with pytest.raises(TypeError, match=r"relation_module must be a torch.nn.Module, got function"):
        pymeta.RelationNet(conv_maps(C), C, lambda x: x)
