"""Task-sharded meta-training on a real 2-process gloo group (CPU, 127.0.0.1).

Workers are module-level functions (spawned processes import this module) that save
what they computed to ``tmp_path``; the assertions run here, in the parent.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    cluster_episode,
    conv_bn,
    mlp,
    regression_episode,
    relative_error,
)
from torch import nn

import pymeta
from pymeta import checkpoint, cli, distributed, training
from pymeta.data import Episode

ALGOS = ("maml", "fomaml", "metasgd", "anil", "protonet", "reptile", "finetune", "mamlpp")
TASKS = (4, 5)  # 5 tasks on 2 ranks: unequal shards of 3 and 2


def build(algo: str) -> nn.Module:
    """A small float64 learner, identical in every process (seeded)."""
    torch.manual_seed(0)
    if algo in ("maml", "fomaml", "metasgd", "reptile"):
        kind = {"maml": pymeta.MAML, "fomaml": pymeta.MAML, "metasgd": pymeta.MetaSGD, "reptile": pymeta.Reptile}[algo]
        kwargs = {"first_order": True} if algo == "fomaml" else {}
        learner = kind(mlp(), lr=0.1, steps=2, loss_fn=F.mse_loss, strategy="vmap", **kwargs)
    elif algo == "anil":
        features = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        learner = pymeta.ANIL(features, nn.Linear(16, 3), lr=0.3, steps=2, loss_fn=F.cross_entropy, strategy="vmap")
    elif algo == "mamlpp":  # BatchNorm: per-step running statistics, averaged over the ranks
        learner = pymeta.MAMLpp(conv_bn(), lr=0.3, steps=2, first_order_epochs=0, strategy="vmap")
        learner.set_epoch(3)  # the multi-step loss
    elif algo == "protonet":
        learner = pymeta.ProtoNet(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    else:
        encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        learner = pymeta.FineTune(encoder, n_way=3, lr=0.1, steps=2, base_classes=6, feature_dim=16)
    return learner.double()


def batch(algo: str, tasks: int, seed: int) -> tuple:
    """The global batch: T episodes (or, for FineTune pre-training, 4T examples)."""
    torch.manual_seed(seed)
    if algo in ("maml", "fomaml", "metasgd", "reptile"):
        return Episode(*regression_episode(tasks, shots=5, queries=6))
    if algo == "mamlpp":
        return Episode(*classification_episode(tasks))
    if algo == "finetune":
        return training.Batch(torch.randn(4 * tasks, 8, dtype=torch.float64), torch.randint(0, 6, (4 * tasks,)))
    return Episode(*cluster_episode(tasks, ways=3, shots=2, queries=3))


def meta_grads(learner: nn.Module, algo: str, global_batch: tuple) -> tuple[list[torch.Tensor], float | None]:
    """One outer step's gradients through pymeta's own training step, sharded in a group."""
    spec = SimpleNamespace(loss_fn=F.cross_entropy if algo in ("anil", "protonet", "mamlpp") else F.mse_loss)
    local = distributed.shard(global_batch)
    learner.zero_grad(set_to_none=True)
    loss = training.learner_step(learner, local, spec)
    loss = distributed.all_reduce_grads(learner, len(local[0]), len(global_batch[0]), loss)
    return [p.grad.clone() for p in learner.parameters() if p.grad is not None], loss


def state(learner: pymeta.algorithms.Learner) -> list[torch.Tensor]:
    """What a training step changes: the parameters and the learner's task statistics."""
    return [*learner.parameters(), *learner.task_statistics()]


def grads_worker(out: str) -> None:
    results = {}
    for algo in ALGOS:
        for tasks in TASKS:
            learner = build(algo)
            grads, loss = meta_grads(learner, algo, batch(algo, tasks, seed=tasks))
            # Several outer steps: every rank must end with bit-identical parameters.
            opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
            for seed in range(3):
                meta_grads(learner, algo, batch(algo, tasks, seed=100 + seed))
                opt.step()
            params = [p.detach().clone() for p in state(learner)]
            results[algo, tasks] = {"grads": grads, "loss": loss, "params": params,
                                    "local": len(distributed.shard(batch(algo, tasks, 0))[0])}
    torch.save(results, Path(out) / f"rank{distributed.rank()}.pt")


def test_sharded_meta_gradients_equal_single_process(tmp_path):
    """Every algorithm: the all-reduced meta-gradient of 2 shards is the single-process
    meta-gradient over the same tasks (float64, 1e-10 relative), for even and odd T, and
    after 3 Adam steps both ranks hold bit-identical parameters (and task statistics)."""
    distributed.launch(grads_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for algo in ALGOS:
        for tasks in TASKS:
            learner = build(algo)
            expected, expected_loss = meta_grads(learner, algo, batch(algo, tasks, seed=tasks))
            opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
            for seed in range(3):
                meta_grads(learner, algo, batch(algo, tasks, seed=100 + seed))
                opt.step()
            r0, r1 = ranks[0][algo, tasks], ranks[1][algo, tasks]
            err = relative_error(r0["grads"], expected)
            params_err = relative_error(r0["params"], state(learner))
            print(f"{algo} T={tasks} shards {r0['local']}+{r1['local']}: meta-grad rel err {err:.2e}, "
                  f"params after 3 steps rel err {params_err:.2e}")
            assert r0["local"] + r1["local"] == len(batch(algo, tasks, 0)[0])
            assert err < 1e-10
            assert all(torch.equal(a, b) for a, b in zip(r0["grads"], r1["grads"], strict=True))
            if expected_loss is not None:
                assert r0["loss"] == r1["loss"] == pytest.approx(expected_loss, rel=1e-12)
            assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
            assert params_err < 1e-10


def test_pymeta_train_nproc_2_matches_single_process(tmp_path, capfd):
    """`pymeta train --nproc 2`: rank 0 alone writes the best and last checkpoints and
    prints the report once, and the trained model equals the single-process one."""
    common = ["train", "--algo", "maml", "--data", "sinusoid", "--iterations", "6", "--meta-batch", "5",
              "--val-every", "3", "--val-episodes", "10", "--eval-episodes", "15", "--strategy", "vmap",
              "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "one.pt")]) == 0
    single = capfd.readouterr().out
    assert cli.main([*common, "--out", str(tmp_path / "two.pt"), "--nproc", "2"]) == 0
    sharded = capfd.readouterr().out
    assert sharded.count("test MSE after adaptation") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-last.pt", "one.pt", "two-last.pt", "two.pt"]
    one, two = checkpoint.load(tmp_path / "one-last.pt"), checkpoint.load(tmp_path / "two-last.pt")
    assert two["step"] == 6 and two["data"] == one["data"] == {"seed": 0, "batches": 6}
    err = relative_error(list(two["model"].values()), list(one["model"].values()))
    print(f"single vs 2-process parameters after 6 steps: rel err {err:.2e}")
    assert err < 1e-5  # float32, rounding only
    assert [h["step"] for h in two["history"]] == [3, 6]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["val"] == pytest.approx(b["val"], rel=1e-4)
    # The test statistics (sharded evaluation, gathered) agree too.
    numbers = [[float(x) for x in re.findall(r"\d+\.\d+", out.split("trained in")[0])] for out in (single, sharded)]
    assert len(numbers[0]) == 4 and numbers[0] == pytest.approx(numbers[1], rel=1e-3)


def failing_worker(out: str, stall: bool) -> None:
    class Failing(pymeta.MAML, cli=("failing",)):  # registered in this worker process only
        calls = 0

        def train_step(self, batch, loss_fn):
            Failing.calls += 1
            if distributed.rank() == 1 and Failing.calls == 3:
                (Path(out) / "failed_at").write_text(repr(time.time()))
                if stall:
                    time.sleep(300)  # a hung rank: the others must not wait for it forever
                raise ValueError("simulated failure on rank 1 at step 3")
            return super().train_step(batch, loss_fn)

    config = training.TrainConfig(algo="failing", data="sinusoid", iterations=50, meta_batch=4, val_every=50,
                                  val_episodes=4, eval_episodes=4, strategy="vmap", out=str(Path(out) / "x.pt"))
    training.train(config, progress=False)


def test_a_failing_rank_stops_the_group_with_its_error(tmp_path):
    """Rank 1 raises at step 3 while rank 0 waits in the all-reduce: the launcher stops
    both and raises the *failing* rank's exception text, within seconds, no hang."""
    with pytest.raises(distributed.WorkerError) as info:
        distributed.launch(failing_worker, 2, str(tmp_path), False, timeout=60)
    stopped_after = time.time() - float((tmp_path / "failed_at").read_text())
    print(f"group stopped {stopped_after:.1f} s after the failure:\n{info.value}")
    assert info.value.rank == 1
    assert "ValueError: simulated failure on rank 1 at step 3" in str(info.value)
    assert stopped_after < 30


def test_a_stalled_rank_makes_the_others_time_out(tmp_path):
    """Rank 1 hangs at step 3: rank 0's collective fails after the process-group timeout
    (5 s here) and the launcher reports it and stops the hung rank."""
    with pytest.raises(distributed.WorkerError) as info:
        distributed.launch(failing_worker, 2, str(tmp_path), True, timeout=5)
    stopped_after = time.time() - float((tmp_path / "failed_at").read_text())
    print(f"group stopped {stopped_after:.1f} s after rank 1 stalled:\n{str(info.value)[-300:]}")
    assert info.value.rank == 0
    assert "Timed out" in str(info.value)
    assert stopped_after < 30


def test_shard_ranges_and_errors():
    assert [distributed.shard_range(5, r, 2) for r in range(2)] == [range(0, 3), range(3, 5)]
    assert [len(distributed.shard_range(7, r, 3)) for r in range(3)] == [3, 2, 2]
    assert distributed.shard_range(1, 1, 2) == range(1, 1)
    ep = Episode(*regression_episode(3))
    assert distributed.shard(ep) is not ep and torch.equal(distributed.shard(ep).query_y, ep.query_y)
    with pytest.raises(ValueError, match=r"rank must be < world_size = 2, got 2"):
        distributed.shard_range(4, 2, 2)
    with pytest.raises(ValueError, match=r"batch tensors must share their leading dim"):
        distributed.shard((torch.zeros(3, 1), torch.zeros(4)))
    with pytest.raises(ValueError, match=r"local_tasks must be <= total_tasks = 3, got 4"):
        distributed.all_reduce_grads(nn.Linear(1, 1), 4, 3)
    # Without a process group nothing is communicated.
    assert distributed.all_reduce_grads(nn.Linear(1, 1), 3, 3, loss=1.5) == 1.5
