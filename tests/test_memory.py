"""Memory options: ``meta_loss(task_chunk=...)`` and ``checkpoint_steps`` keep the
meta-gradients exact (float64 per-task reference) while storing less for backward."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    conv_bn,
    per_task_sum,
    reference_meta_grads,
    relative_error,
)

import pymeta


class _Saved:
    """A tensor autograd saved for backward, counted while it is alive."""

    live = peak = 0

    def __init__(self, t):
        self.t, self.size = t, t.numel() * t.element_size()
        _Saved.live += self.size
        _Saved.peak = max(_Saved.peak, _Saved.live)

    def __del__(self):
        _Saved.live -= self.size


def saved_bytes(fn):
    """``(peak bytes of tensors autograd held for backward while fn ran, fn())``."""
    _Saved.live = _Saved.peak = 0
    with torch.autograd.graph.saved_tensors_hooks(_Saved, lambda s: s.t):
        out = fn()
    return _Saved.peak, out


@pytest.mark.parametrize("strategy", ["lowered", "loop"])
@pytest.mark.parametrize("algo", [pymeta.MAML, pymeta.MetaSGD])
def test_checkpointed_inner_loop_matches_reference_and_saves_less(algo, strategy):
    torch.manual_seed(0)
    model = conv_bn().double()
    episode = classification_episode(tasks=3)
    sx, sy, qx, qy = episode
    steps = 4
    plain = algo(model, lr=0.3, steps=steps, strategy=strategy)
    ckpt = algo(model, lr=0.3, steps=steps, strategy=strategy, checkpoint_steps=True)
    ckpt.load_state_dict(plain.state_dict())
    (plain_bytes, plain_pred), (ckpt_bytes, ckpt_pred) = (saved_bytes(lambda a=a: a.episode(sx, sy, qx)) for a in (plain, ckpt))
    # Equal up to rounding: a step that builds no graph (the checkpointed forward) runs the
    # fused BatchNorm kernel's backward, one that does runs its differentiable reference.
    torch.testing.assert_close(ckpt_pred, plain_pred, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(per_task_sum(F.cross_entropy, p, qy), list(a.parameters()))
             for a, p in ((plain, plain_pred), (ckpt, ckpt_pred))]
    assert relative_error(grads[1], grads[0]) < 1e-12  # weights and (Meta-SGD) learning rates
    if algo is pymeta.MAML:
        expected = reference_meta_grads(model, episode, F.cross_entropy, 0.3, steps)
        assert relative_error(list(grads[1]), expected) < 1e-10
    # Each checkpointed step keeps one set of fast weights, not a support graph.
    assert ckpt_bytes < 0.75 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_checkpointed_step_replays_dropout_masks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    sx, qx = torch.randn(2, 2, 5, 3, dtype=torch.float64)
    sy, qy = torch.randn(2, 2, 5, 1, dtype=torch.float64)
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(1)  # same masks in both runs, if the recomputation replays them
        pred = pymeta.MAML(model, lr=0.1, steps=2, strategy="lowered", checkpoint_steps=checkpoint).episode(sx, sy, qx)
        grads.append(torch.autograd.grad(F.mse_loss(pred, qy), list(model.parameters())))
    assert relative_error(grads[1], grads[0]) < 1e-12


@pytest.mark.parametrize("task_chunk", [None, 1, 2])
def test_meta_loss_equals_mean_query_loss_and_its_gradient(task_chunk):
    torch.manual_seed(0)
    model = conv_bn().double()
    episode = classification_episode(tasks=5)
    sx, sy, qx, qy = episode
    maml = pymeta.MetaSGD(model, lr=0.3, steps=2, strategy="loop")
    expected_loss = per_task_sum(F.cross_entropy, maml.episode(sx, sy, qx), qy) / 5
    expected = torch.autograd.grad(expected_loss, list(maml.parameters()))
    loss = maml.meta_loss(sx, sy, qx, qy, task_chunk=task_chunk)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-14, atol=0)
    assert relative_error(torch.autograd.grad(loss, list(maml.parameters())), expected) < 1e-12


def test_meta_loss_chunks_bound_saved_memory_and_refuse_double_backward():
    model = conv_bn().double()
    sx, sy, qx, qy = classification_episode(tasks=6)
    maml = pymeta.MAML(model, lr=0.3, strategy="loop")
    whole, _ = saved_bytes(lambda: maml.episode(sx, sy, qx))
    # Each chunk's graph is freed inside meta_loss before the next chunk runs.
    chunked, loss = saved_bytes(lambda: maml.meta_loss(sx, sy, qx, qy, task_chunk=1))
    assert chunked < 0.3 * whole, (chunked, whole)
    (grad,) = torch.autograd.grad(loss, [model[0].weight], create_graph=True)
    with pytest.raises(RuntimeError, match=r"does not require grad|once_differentiable"):
        grad.sum().backward()
    with torch.no_grad():  # evaluation: just the loss
        torch.testing.assert_close(maml.meta_loss(sx, sy, qx, qy), loss.detach())


def test_meta_loss_bad_arguments():
    maml = pymeta.MAML(conv_bn().double(), lr=0.3)
    sx, sy, qx, qy = classification_episode(tasks=3)
    with pytest.raises(ValueError, match=r"task_chunk must be >= 1, got 0"):
        maml.meta_loss(sx, sy, qx, qy, task_chunk=0)
    with pytest.raises(ValueError, match=r"query_x and query_y must agree on the number of tasks"):
        maml.meta_loss(sx, sy, qx, qy[:2])
    with pytest.raises(ValueError, match=r"query_y must hold class labels in \[0, 4\)"):
        maml.meta_loss(sx, sy, qx, qy + 4)


def _features() -> torch.nn.Module:
    return torch.nn.Sequential(*list(conv_bn().children())[:-1]).double()


@pytest.mark.parametrize(
    "make",
    [
        lambda: pymeta.ProtoNet(_features(), strategy="loop"),
        lambda: pymeta.ANIL(_features(), torch.nn.Linear(16, 4).double(), lr=0.3, steps=2, strategy="loop"),
    ],
    ids=["protonet", "anil"],
)
def test_chunked_meta_loss_of_protonet_and_anil_is_exact_and_bounds_memory(make):
    torch.manual_seed(0)
    learner = make()
    sx, sy, qx, qy = classification_episode(tasks=6)
    params = list(learner.parameters())
    whole, pred = saved_bytes(lambda: learner.episode(sx, sy, qx))
    expected_loss = F.cross_entropy(pred.flatten(0, 1), qy.flatten())
    expected = torch.autograd.grad(expected_loss, params)
    for task_chunk in (1, 4):
        chunked, loss = saved_bytes(lambda c=task_chunk: learner.meta_loss(sx, sy, qx, qy, task_chunk=c))
        torch.testing.assert_close(loss, expected_loss, rtol=1e-14, atol=0)
        error = relative_error(torch.autograd.grad(loss, params), expected)
        print(f"task_chunk={task_chunk}: saved {chunked} of {whole} bytes, gradient error {error:.2e}")
        assert error < 1e-12
    assert chunked < 0.8 * whole and saved_bytes(lambda: learner.meta_loss(sx, sy, qx, qy, task_chunk=1))[0] < 0.3 * whole
    # ProtoNet (N inferred from support_y) names the class that has no prototype.
    with pytest.raises(ValueError, match=r"query_y must hold class labels in \[0, 4\)|class 4 has no support example"):
        learner.meta_loss(sx, sy, qx, qy + 4)


def test_task_chunk_of_protonet_makes_episode_loss_chunked():
    learner = pymeta.ProtoNet(_features(), strategy="loop", task_chunk=2)
    sx, sy, qx, qy = classification_episode(tasks=4)
    loss = pymeta.algorithms.episode_loss(learner, sx, sy, qx, qy, F.cross_entropy)
    assert loss.grad_fn.name().endswith("_ChunkedMeanLossBackward")
    with pytest.raises(ValueError, match="task_chunk must be >= 1, got 0"):
        pymeta.ProtoNet(_features(), task_chunk=0)
