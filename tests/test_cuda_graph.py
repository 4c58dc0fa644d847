"""CUDA-graph capture of a meta-step (:class:`pymeta.CUDAGraphStep`).

A CUDA graph cannot capture a host sync. Without a GPU the capture itself cannot run,
so the CPU tests check the property it needs on the real code path: a whole meta-step
(meta-loss, backward, optimizer step) of every learner dispatches no ATen op that
reads a value back to the host once the value checks are deferred, and the deferred
checks still catch bad labels in a later batch. The tests marked ``gpu`` capture and
replay for real, against the eager step, wherever a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_episode, conv_bn, regression_episode
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pymeta
from pymeta import _value_checks, training
from pymeta.algorithms.base import episode_loss
from pymeta.cuda_graph import _check_capturable, _checks_on_inputs, _OptimizerSnapshot

aten = torch.ops.aten
# Ops whose CUDA kernels copy a value to the host (item/bool/int, data-dependent shapes).
_SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default,
    aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
    aten.unique_dim.default, aten.repeat_interleave.Tensor,
}


class HostSyncs(TorchDispatchMode):
    """Records the ops of :data:`_SYNC_OPS` dispatched inside, and boolean-mask indexing
    (its CUDA kernel runs ``nonzero``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func is aten.index.Tensor and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if func in _SYNC_OPS or masked:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _learners() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """A learner of every kind with a batch it trains on (concrete strategies: "auto"
    must have chosen before a capture)."""
    cls = classification_episode(tasks=3, ways=4, shots=2, queries=3)
    reg = regression_episode()
    mlp = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))

    def features() -> nn.Module:
        return nn.Sequential(*list(conv_bn().children())[:-1])

    return {
        "maml-lowered": (pymeta.MAML(conv_bn(), lr=0.1, steps=2, strategy="lowered"), cls),
        "maml-loop-chunked": (pymeta.MAML(conv_bn(), lr=0.1, strategy="loop", task_chunk=2), cls),
        "maml-vmap": (pymeta.MAML(conv_bn(), lr=0.1, steps=2, strategy="vmap"), cls),
        "fomaml-regression": (pymeta.MAML(mlp, lr=0.1, first_order=True, strategy="lowered"), reg),
        "metasgd": (pymeta.MetaSGD(conv_bn(), lr=0.1, strategy="loop"), cls),
        "anil": (pymeta.ANIL(features(), nn.Linear(16, 4), lr=0.1, strategy="loop"), cls),
        "protonet": (pymeta.ProtoNet(features(), strategy="loop", n_way=4), cls),
        "finetune": (pymeta.FineTune(features(), n_way=4, lr=0.1, steps=3, base_classes=10, feature_dim=16,
                                     strategy="loop"), cls),
    }


LEARNERS = ("maml-lowered", "maml-loop-chunked", "maml-vmap", "fomaml-regression", "metasgd", "anil", "protonet",
            "finetune")


def _meta_step(learner: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What CUDAGraphStep captures with an optimizer: loss, backward, optimizer step.

    SGD with momentum steps on the device as is; Adam reads its step count on the host
    unless ``capturable=True``, which is for CUDA tensors only.
    """
    opt = torch.optim.SGD(learner.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = F.mse_loss if batch[1].is_floating_point() else F.cross_entropy
    loss = episode_loss(learner, *batch, loss_fn)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("name", LEARNERS)
def test_meta_step_has_no_host_sync_with_deferred_checks(name: str) -> None:
    learner, batch = _learners()[name]
    learner.double()
    with HostSyncs() as eager:
        _meta_step(learner, batch)
    with _value_checks.deferred_value_checks() as checks, HostSyncs() as deferred:
        _meta_step(learner, batch)
    print(f"{name}: eager host syncs {eager.ops}, deferred {deferred.ops}, {len(checks)} deferred checks")
    # Classification steps check labels (the detector must see it eagerly, or this test
    # checks nothing); regression steps have nothing to check.
    assert bool(eager.ops) == bool(checks) == (not batch[1].is_floating_point())
    assert deferred.ops == []
    # Each deferred check reads only the batch, so it can run on a new batch before a replay.
    _checks_on_inputs(checks, batch)


@pytest.mark.parametrize(
    ("name", "where", "message"),
    [
        ("maml-lowered", (1, 0, 2), r"support_y must hold class labels in \[0, 4\).*support_y\[0, 2\] = 7"),
        ("maml-loop-chunked", (3, 2, 1), r"query_y must hold class labels in \[0, 4\).*query_y\[0, 1\] = 7"),
        ("protonet", (1, 1, 0), r"support_y must be in \[0, n_way\) = \[0, 4\), got support_y\[1, 0\] = 7"),
        ("finetune", (1, 2, 5), r"support_y must be in \[0, n_way\) = \[0, 4\), got support_y\[2, 5\] = 7"),
    ],
)
def test_deferred_checks_catch_bad_labels_of_a_later_batch(name: str, where: tuple[int, int, int], message: str) -> None:
    learner, batch = _learners()[name]
    learner.double()
    with _value_checks.deferred_value_checks() as checks:
        _meta_step(learner, batch)
    for check in checks:  # the recorded batch is fine
        check.run()
    tensor, t, s = where
    batch[tensor][t, s] = 7  # the next batch, copied into the same tensors
    with pytest.raises(ValueError, match=message):
        for check in checks:
            check.run()


def test_deferred_checks_catch_a_missing_class() -> None:
    learner, batch = _learners()["protonet"]
    learner.double()
    with _value_checks.deferred_value_checks() as checks:
        _meta_step(learner, batch)
    batch[1][2] = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])  # class 3 missing in task 2
    with pytest.raises(ValueError, match="class 3 has no example in task 2 of support_y"):
        for check in checks:
            check.run()


def test_a_check_on_a_computed_tensor_is_refused() -> None:
    sx, sy, qx, qy = classification_episode()
    with _value_checks.deferred_value_checks() as checks:
        _value_checks.class_counts(sy.clone(), 4)
    with pytest.raises(RuntimeError, match=r"computed inside the step.*validate=False"):
        _checks_on_inputs(checks, (sx, sy, qx, qy))


def test_protonet_fixed_n_way_equals_inferred() -> None:
    sx, sy, qx, _ = classification_episode()
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 8)).double()
    inferred = pymeta.ProtoNet(encoder).episode(sx, sy, qx)
    fixed = pymeta.ProtoNet(encoder, n_way=4).episode(sx, sy, qx)
    assert torch.equal(inferred, fixed)
    with pytest.raises(ValueError, match=r"support_y must be in \[0, n_way\) = \[0, 3\)"):
        pymeta.ProtoNet(encoder, n_way=3).episode(sx, sy, qx)
    with pytest.raises(ValueError, match="class 4 has no example in task 0 of support_y"):
        pymeta.ProtoNet(encoder, n_way=5).episode(sx, sy, qx)
    with pytest.raises(ValueError, match="n_way must be >= 2"):
        pymeta.ProtoNet(encoder, n_way=1)


def test_step_without_cuda_or_with_bad_arguments_raises_clearly() -> None:
    learner, batch = _learners()["maml-lowered"]
    with pytest.raises(TypeError, match="example must be a batch"):
        pymeta.CUDAGraphStep(learner, batch[:3])
    with pytest.raises(TypeError, match="learner must be a pymeta learner"):
        pymeta.CUDAGraphStep(nn.Linear(1, 1), batch)
    for options, message in [
        ({"check_finite": True}, "learner has check_finite=True, which reads values on the host"),
        ({"checkpoint_steps": True}, "learner has checkpoint_steps=True, which saves and restores the RNG state"),
    ]:
        with pytest.raises(ValueError, match=message):
            pymeta.CUDAGraphStep(pymeta.MAML(conv_bn(), lr=0.1, **options), batch)
    with pytest.raises(ValueError, match=r"head has check_finite=True"):
        pymeta.CUDAGraphStep(pymeta.ANIL(nn.Flatten(), nn.Linear(64, 4), lr=0.1, check_finite=True), batch)
    with pytest.raises(ValueError, match=r"ProtoNet\(..., n_way=N\)"):
        pymeta.CUDAGraphStep(pymeta.ProtoNet(nn.Flatten()), batch)
    with pytest.raises(ValueError, match="warmup must be <= max_warmup = 2, got 3"):
        pymeta.CUDAGraphStep(learner, batch, max_warmup=2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device is visible to torch"):
            pymeta.CUDAGraphStep(learner, batch)
    else:
        with pytest.raises(ValueError, match="example must be on a CUDA device"):
            pymeta.CUDAGraphStep(learner, batch)


def test_only_optimizers_that_step_on_the_device_are_captured() -> None:
    params = list(nn.Linear(2, 2).parameters())
    for ok in (torch.optim.SGD(params, lr=0.1, momentum=0.9), torch.optim.Adam(params, capturable=True),
               torch.optim.AdamW(params, capturable=True)):
        _check_capturable(ok)
    for refused, message in [
        (torch.optim.Adam(params), "param group 0 of Adam has capturable=False"),
        (torch.optim.Adagrad(params), "param group 0 of Adagrad steps with host-side state"),
        (torch.optim.SGD(params, lr=torch.tensor(0.1)), "param group 0 of SGD steps with host-side state"),
    ]:
        with pytest.raises(ValueError, match=message):
            _check_capturable(refused)


def test_a_captured_optimizer_that_changes_is_a_clear_error() -> None:
    params = list(nn.Linear(2, 2).parameters())
    lr = torch.tensor(0.1)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # momentum buffers exist, as after CUDAGraphStep's warm-up
    snapshot = _OptimizerSnapshot(opt)
    lr.fill_(0.01)  # in place: what the graph reads, so allowed
    snapshot.check()
    opt.param_groups[0]["momentum"] = 0.5  # a float baked into the graph
    with pytest.raises(RuntimeError, match=r"param group 0 changed \['momentum'\]"):
        snapshot.check()
    opt.param_groups[0]["momentum"] = 0.9
    snapshot.check()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: new lr and state tensors
    with pytest.raises(RuntimeError, match=r"param group 0 changed \['lr'\]"):
        snapshot.check()
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(RuntimeError, match="state tensors were replaced"):
        snapshot.check()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algo": "maml"}, "cuda_graph captures CUDA graphs and needs a CUDA device, got device 'cpu'"),
        ({"algo": "reptile", "device": "cuda"}, "cuda_graph only applies to algo anil, fomaml, maml, metasgd, protonet, got algo 'reptile'"),
        ({"algo": "maml", "device": "cuda", "checkpoint_steps": True}, "cuda_graph and checkpoint_steps exclude"),
    ],
)
def test_train_config_checks_cuda_graph(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        training.TrainConfig(cuda_graph=True, **options).resolved()


def test_captured_training_turns_only_the_inner_checks_off() -> None:
    config = training.TrainConfig(algo="maml", data="sinusoid")
    assert config.inner_check_finite
    captured = training.TrainConfig(algo="maml", data="sinusoid", cuda_graph=True, device="cuda")
    assert captured.check_finite and not captured.inner_check_finite


# ------------------------------------------------------------------ real capture (GPU)
cuda = pytest.mark.gpu  # skipped without a CUDA device (tests/conftest.py)


def _on_cuda(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]]]:
    """The learner in float32 on the GPU and three batches of its example's shapes."""
    learner, batch = _learners()[name]
    batches = [tuple(t.cuda() for t in batch)]
    for _ in range(2):
        batches.append(tuple((torch.randn_like(t) if t.is_floating_point() else t).cuda() for t in batch))
    return learner.float().cuda(), [tuple(t.float() if t.is_floating_point() else t for t in b) for b in batches]


@cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_replayed_gradients_equal_eager(name: str) -> None:
    learner, batches = _on_cuda(name)
    step = pymeta.CUDAGraphStep(learner, batches[0])
    loss_fn = F.mse_loss if batches[0][1].is_floating_point() else F.cross_entropy
    for batch in batches[1:]:
        loss = step(*batch)
        # FineTune's base-class head takes no part in episodes: None in both.
        replayed = [None if p.grad is None else p.grad.clone() for p in learner.parameters()]
        learner.zero_grad(set_to_none=True)
        eager = episode_loss(learner, *batch, loss_fn)
        eager.backward()
        print(f"{name}: loss {loss.item():.6f} vs eager {eager.item():.6f}")
        torch.testing.assert_close(loss, eager.detach(), rtol=1e-5, atol=1e-6)
        for r, p in zip(replayed, learner.parameters(), strict=True):
            assert (r is None) == (p.grad is None)
            if r is not None:
                torch.testing.assert_close(r, p.grad, rtol=1e-4, atol=1e-5)


@cuda
def test_whole_training_step_equals_eager_adam() -> None:
    learner, batches = _on_cuda("maml-lowered")
    twin = _learners()["maml-lowered"][0].float().cuda()
    twin.load_state_dict(learner.state_dict())
    step = pymeta.CUDAGraphStep(learner, batches[0], optimizer=torch.optim.Adam(learner.parameters(), 1e-3,
                                                                               capturable=True))
    opt = torch.optim.Adam(twin.parameters(), 1e-3, capturable=True)
    for _ in range(3):  # the warm-up steps CUDAGraphStep took on the example
        opt.zero_grad()
        episode_loss(twin, *batches[0], F.cross_entropy).backward()
        opt.step()
    for batch in batches[1:]:
        step(*batch)
        opt.zero_grad()
        episode_loss(twin, *batch, F.cross_entropy).backward()
        opt.step()
    for a, b in zip(learner.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda
def test_replay_checks_labels_and_shapes() -> None:
    learner, batches = _on_cuda("maml-lowered")
    step = pymeta.CUDAGraphStep(learner, batches[0])
    bad = list(batches[1])
    bad[1] = bad[1].clone()
    bad[1][0, 0] = 9
    with pytest.raises(ValueError, match=r"support_y must hold class labels in \[0, 4\)"):
        step(*bad)
    with pytest.raises(ValueError, match=r"query_x must have the example's shape"):
        step(*batches[1][:2], batches[1][2][:, :3], batches[1][3])
    auto = pymeta.MAML(conv_bn().cuda(), lr=0.1)  # warm-up runs until "auto" has chosen
    pymeta.CUDAGraphStep(auto, batches[0], max_warmup=100)
    assert auto.strategy is not None


@cuda
@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_captured_training_follows_the_eager_run(algo: str, tmp_path) -> None:
    def run(cuda_graph: bool) -> list[float]:
        config = training.TrainConfig(algo=algo, data="sinusoid" if algo == "maml" else "glyphs", iterations=6,
                                      val_every=6, val_episodes=4, eval_episodes=4, device="cuda",
                                      strategy="lowered" if algo == "maml" else "loop", cuda_graph=cuda_graph,
                                      out=str(tmp_path / f"{cuda_graph}.pt"))
        return training.train(config, progress=False, log=lambda _: None).losses

    eager, captured = run(False), run(True)
    print(f"{algo}: eager {eager}, captured {captured}")
    assert captured == pytest.approx(eager, rel=1e-4, abs=1e-5)
