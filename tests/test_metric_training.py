"""RelationNet and MatchingNet through the learner contract: their own training loss,
``meta_loss(task_chunk=k)``, a real 2-process gloo group, ``pymeta train`` and --resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_episode, conv_maps, relative_error
from torch import nn

import pymeta
from pymeta import distributed, training
from pymeta.algorithms.relationnet import relation_mse_loss
from pymeta.data import Episode

ALGOS = ("relationnet", "matchingnet")


def build(algo: str, strategy: str = "loop") -> pymeta.algorithms.Learner:
    """A small float64 learner with BatchNorm, identical in every process (seeded)."""
    torch.manual_seed(0)
    if algo == "relationnet":
        return pymeta.RelationNet(conv_maps(4), 4, strategy=strategy).double()
    return pymeta.MatchingNet(nn.Sequential(conv_maps(2), nn.Flatten()), 32, strategy=strategy).double()


def batch(tasks: int, seed: int) -> Episode:
    torch.manual_seed(seed)
    return Episode(*classification_episode(tasks=tasks, ways=3, shots=2, queries=2))


def per_task_mean_loss(learner, ep: Episode) -> torch.Tensor:
    pred = learner.episode(ep.support_x, ep.support_y, ep.query_x)
    loss_fn = learner.query_loss(ep.support_y)
    return sum(loss_fn(p, y) for p, y in zip(pred, ep.query_y, strict=True)) / len(pred)


@pytest.mark.parametrize("algo", ALGOS)
def test_train_step_uses_the_learners_own_loss(algo):
    """MSE against one-hot labels (RelationNet) / NLL of the log-probabilities (MatchingNet),
    whatever classification loss the command passes."""
    learner = build(algo)
    ep = batch(3, seed=1)
    assert learner.query_loss(ep.support_y) is (relation_mse_loss if algo == "relationnet" else F.nll_loss)
    expected = per_task_mean_loss(learner, ep)
    expected_grads = torch.autograd.grad(expected, list(learner.parameters()), allow_unused=True)
    learner.zero_grad()
    loss = learner.train_step(ep, F.cross_entropy)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    grads = [p.grad for p in learner.parameters()]
    pairs = [(g, e) for g, e in zip(grads, expected_grads, strict=True) if e is not None]
    assert relative_error([g for g, _ in pairs], [e for _, e in pairs]) < 1e-12
    if algo == "relationnet":
        ce = pymeta.RelationNet(conv_maps(4), 4, loss="cross_entropy").double()
        assert ce.query_loss(ep.support_y) is F.cross_entropy


@pytest.mark.parametrize("strategy", ["loop", "lowered"])  # per-task losses: a loop, or vmap
@pytest.mark.parametrize("algo", ALGOS)
def test_meta_loss_task_chunks_are_exact(algo, strategy):
    learner = build(algo, strategy)
    ep = batch(5, seed=2)
    expected = per_task_mean_loss(learner, ep)
    params = list(learner.parameters())
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    used = [i for i, g in enumerate(expected_grads) if g is not None]
    for task_chunk in (1, 2, None):
        loss = learner.meta_loss(*ep, task_chunk=task_chunk)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        err = relative_error([grads[i] for i in used], [expected_grads[i] for i in used])
        print(f"{algo} task_chunk={task_chunk}: loss {loss.item():.6f} vs {expected.item():.6f}, grad rel err {err:.1e}")
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        assert err < 1e-12
    with pytest.raises(ValueError, match=r"query_y must hold class labels in \[0, 3\)"):
        learner.meta_loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y + 3, task_chunk=2)


def grads_worker(out: str) -> None:
    results = {}
    for algo in ALGOS:
        learner = build(algo)
        global_batch = batch(5, seed=3)  # 5 tasks on 2 ranks: shards of 3 and 2
        local = distributed.shard(global_batch)
        loss = learner.train_step(local, F.cross_entropy)
        loss = distributed.all_reduce_grads(learner, len(local[0]), len(global_batch[0]), loss)
        results[algo] = ([p.grad.clone() for p in learner.parameters() if p.grad is not None], loss)
    torch.save(results, Path(out) / f"rank{distributed.rank()}.pt")


def test_sharded_meta_gradients_equal_single_process(tmp_path):
    distributed.launch(grads_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for algo in ALGOS:
        learner = build(algo)
        expected_loss = learner.train_step(batch(5, seed=3), F.cross_entropy)
        expected = [p.grad for p in learner.parameters() if p.grad is not None]
        (grads0, loss0), (grads1, loss1) = ranks[0][algo], ranks[1][algo]
        err = relative_error(grads0, expected)
        print(f"{algo}: sharded meta-gradient rel err {err:.2e}")
        assert err < 1e-10 and all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
        assert loss0 == loss1 == pytest.approx(expected_loss.item(), rel=1e-12)


def config(tmp_path, algo: str, name: str, iterations: int) -> training.TrainConfig:
    return training.TrainConfig(algo=algo, data="glyphs", iterations=iterations, meta_batch=2, queries=2,
                                val_every=1, val_episodes=2, eval_episodes=4, strategy="loop",
                                out=str(tmp_path / f"{name}.pt"))


def test_pymeta_train_matchingnet(tmp_path):
    lines = []
    result = training.train(config(tmp_path, "matchingnet", "run", 1), progress=False, log=lines.append)
    assert isinstance(result.learner, pymeta.MatchingNet) and result.learner.fce
    assert "test accuracy (5-way 1-shot):" in lines[0] and 0 <= result.test.mean <= 1


def test_pymeta_train_relationnet_and_resume(tmp_path):
    """The command trains RelationNet on glyphs (the fused path, MSE), reports test
    accuracy, and a run resumed from its checkpoint continues exactly as the uninterrupted
    one; ``relationnet-ce`` builds it with cross-entropy."""
    lines = []
    full = training.train(config(tmp_path, "relationnet", "full", 2), progress=False, log=lines.append)
    assert "test accuracy (5-way 1-shot):" in lines[0] and 0 <= full.test.mean <= 1
    assert full.learner.fused and full.learner.loss == "mse"
    training.train(config(tmp_path, "relationnet", "part", 1), progress=False, log=lambda _: None)
    resumed = training.train(config(tmp_path, "relationnet", "part", 2), progress=False, log=lambda _: None,
                             resume=tmp_path / "part-last.pt")
    print(f"losses {full.losses}, resumed {resumed.losses}")
    assert len(full.losses) == 2 and resumed.losses == full.losses[1:]
    assert resumed.test == full.test
    ce_config = config(tmp_path, "relationnet-ce", "ce", 1).resolved()
    ce = pymeta.RelationNet.from_config(ce_config, training.build(ce_config)[1])
    assert ce.loss == "cross_entropy" and ce.fused


@pytest.mark.parametrize("algo", ALGOS)
def test_compiled_loss_equals_eager(algo):
    """``torch.compile`` of the meta-loss, forward and backward (backend aot_eager, as
    tests/test_compile.py): one graph for RelationNet with ``n_way`` given; MatchingNet's
    ``nn.LSTM`` is a graph break (Dynamo does not trace RNN modules by default)."""
    torch._dynamo.reset()
    learner = build(algo)
    learner.n_way = 3
    params = list(learner.parameters())
    ep = batch(3, seed=4)
    loss_fn = learner.query_loss(ep.support_y)

    def step(sx, sy, qx, qy):
        return loss_fn(learner.episode(sx, sy, qx).flatten(0, 1), qy.flatten())

    eager = step(*ep)
    expected = torch.autograd.grad(eager, params)
    loss = torch.compile(step, backend="aot_eager", fullgraph=algo == "relationnet")(*ep)
    torch.testing.assert_close(loss, eager, rtol=1e-12, atol=0)
    assert relative_error(list(torch.autograd.grad(loss, params)), list(expected)) < 1e-10
    torch._dynamo.reset()
