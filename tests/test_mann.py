"""pymeta.MANN and its sequence episodes: the paper's input protocol, batching over tasks,
the controller against nn.LSTM, episode(), per-instance accuracy, the sampler, the
command, errors. (The fused memory step itself: tests/test_memory_access.py.)"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pymeta
from pymeta import training
from pymeta.algorithms import LEARNERS
from pymeta.cli import main
from pymeta.data import Sequences, SequenceSampler
from pymeta.data.sequences import instance_index
from pymeta.ops.memory_access import composite

SMALL = dict(controller_size=8, memory_rows=10, memory_width=4, read_heads=2)
MODELS = {"mann": SMALL, "lstm": {**SMALL, "memory_rows": 0}}


def model(kind: str, input_dim: int = 5, n_classes: int = 3) -> pymeta.MANN:
    return pymeta.MANN(input_dim, n_classes, **MODELS[kind]).double()


def sequences(T: int = 3, S: int = 12, D: int = 5, N: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(T, S, D, dtype=torch.float64), torch.randint(0, N, (T, S))


@pytest.mark.parametrize("kind", MODELS)
def test_step_t_sees_its_example_and_the_previous_label(kind: str) -> None:
    mann, (x, y) = model(kind), sequences()
    logits = mann(x, y)
    t = 5
    y2 = y.clone()
    y2[:, t] = (y[:, t] + 1) % 3
    changed = mann(x, y2)
    torch.testing.assert_close(changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=0)  # label t not seen yet
    assert (changed[:, t + 1] - logits[:, t + 1]).abs().min() > 0
    x2 = x.clone()
    x2[:, t] += 1
    changed = mann(x2, y)
    torch.testing.assert_close(changed[:, :t], logits[:, :t], rtol=0, atol=0)
    assert (changed[:, t] - logits[:, t]).abs().min() > 0


@pytest.mark.parametrize("kind", MODELS)
def test_the_sequences_of_a_meta_batch_are_independent(kind: str) -> None:
    mann, (x, y) = model(kind), sequences(T=4)
    together = mann(x, y)
    alone = torch.cat([mann(x[t : t + 1], y[t : t + 1]) for t in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_controller_step_is_nn_lstm_fed_the_previous_label() -> None:
    """With the read inputs and the read part of the output layer zeroed, MANN's logits are
    nn.LSTM (same weights) over [x_t, onehot(y_{t-1})] followed by the output layer."""
    mann, (x, y) = model("mann"), sequences()
    D, N, C = 5, 3, SMALL["controller_size"]
    with torch.no_grad():
        mann.controller.weight_ih_l0[:, D + N :] = 0
        mann.head.weight[:, C:] = 0
    lstm = nn.LSTM(D + N, C, batch_first=True).double()
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(mann.controller.weight_ih_l0[:, : D + N])
        for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(lstm, name).copy_(getattr(mann.controller, name))
    previous = torch.zeros(3, 12, N, dtype=torch.float64)
    for t in range(1, 12):
        previous[torch.arange(3), t, y[:, t - 1]] = 1
    want = F.linear(lstm(torch.cat([x, previous], -1))[0], mann.head.weight[:, :C], mann.head.bias)
    torch.testing.assert_close(mann(x, y), want, rtol=1e-12, atol=1e-12)


def plain_mann_logits(mann: pymeta.MANN, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MANN written out plainly from the paper and ntm-one-shot: every weight used as is at
    every step (autograd forms each step's weight gradient), the composite memory step."""
    (T, S), N, C = y.shape, mann.n_classes, mann.controller.hidden_size
    R, W, H = mann.memory_rows, mann.memory_width, mann.read_heads
    lstm = mann.controller
    previous = F.pad(F.one_hot(y[:, :-1], N).double(), (0, 0, 1, 0))
    h, c, reads = torch.zeros(T, C, dtype=x.dtype), torch.zeros(T, C, dtype=x.dtype), torch.zeros(T, H * W, dtype=x.dtype)
    memory = torch.full((T, R, W), 1e-6, dtype=x.dtype)
    usage = F.one_hot(torch.zeros(T, dtype=torch.long), R).double()
    read_weights = usage.unsqueeze(1).expand(T, H, R)
    logits = []
    for t in range(S):
        step_input = torch.cat([x[:, t].flatten(1), previous[:, t], reads], 1)
        gates = step_input @ lstm.weight_ih_l0.T + h @ lstm.weight_hh_l0.T + lstm.bias_ih_l0 + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        interface = mann.interface(h)
        keys = torch.tanh(interface[:, : H * W]).view(T, H, W)
        adds = torch.tanh(interface[:, H * W : 2 * H * W]).view(T, H, W)
        state = composite(memory, usage, read_weights, keys, adds, torch.sigmoid(interface[:, 2 * H * W :]), mann.gamma)
        reads, read_weights, memory, usage = state.reads.flatten(1), state.read_weights, state.memory, state.usage
        logits.append(mann.head(torch.cat([h, reads], 1)))
    return torch.stack(logits, 1)


def test_logits_and_gradients_equal_a_plain_step_by_step_mann() -> None:
    mann, (x, y) = model("mann"), sequences(S=20)
    logits = [mann(x, y), plain_mann_logits(mann, x, y)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-12, atol=1e-12)
    grads = []
    for out in logits:
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten())
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(mann.parameters()))]))
    error = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    print(f"MANN vs plain step-by-step: gradient relative error {error:.3e}")
    assert error < 1e-12


@pytest.mark.parametrize("kind", MODELS)
def test_episode_predicts_each_query_one_step_after_the_support_sequence(kind: str) -> None:
    mann, (sx, sy) = model(kind), sequences(T=2, S=6)
    qx = torch.randn(2, 4, 5, dtype=torch.float64)
    pred = mann.episode(sx, sy, qx)
    assert pred.shape == (2, 4, 3)
    for q in range(4):
        x = torch.cat([sx, qx[:, q : q + 1]], 1)
        y = torch.cat([sy, torch.zeros(2, 1, dtype=torch.long)], 1)  # a step's own label is not an input
        torch.testing.assert_close(pred[:, q], mann(x, y)[:, -1], rtol=1e-12, atol=1e-12)


def test_instance_index_counts_earlier_steps_with_the_same_label() -> None:
    y = torch.tensor([[2, 0, 2, 2, 1, 0]])
    assert instance_index(y, 3).tolist() == [[0, 0, 1, 2, 0, 1]]


def test_per_instance_accuracy_matches_a_loop() -> None:
    N, L = 3, 4
    mann = model("mann")
    y = torch.stack([torch.arange(N).repeat_interleave(L)[torch.randperm(N * L)] for _ in range(5)])
    batch = Sequences(torch.randn(5, N * L, 5, dtype=torch.float64), y)
    got = mann.task_metric(batch, "classification")
    pred = mann(batch.x, y).argmax(-1)
    want = torch.zeros(5, L, dtype=torch.float64)
    for t in range(5):
        seen = [0] * N
        for s in range(N * L):
            want[t, seen[y[t, s]]] += float(pred[t, s] == y[t, s]) / N
            seen[y[t, s]] += 1
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"exactly L = 4 times in each sequence of y"):
        mann.task_metric(Sequences(batch.x, torch.zeros_like(y)), "classification")


def class_data(classes: int = 6, per_class: int = 5, dim: int = 4) -> TensorDataset:
    """Example ``i`` of class ``c`` is ``[c, i, c, i]``: a drawn input names its class."""
    c = torch.arange(classes).repeat_interleave(per_class)
    i = torch.arange(per_class).repeat(classes)
    x = torch.stack([c, i] * (dim // 2), 1).double()
    data = TensorDataset(x, c)
    data.labels = c
    return data


def test_sequence_sampler_draws_shuffled_randomly_labelled_classes() -> None:
    data = class_data()
    batch = SequenceSampler(data, n_way=3, instances=4, meta_batch=5, seed=0).sample()
    assert batch.x.shape == (5, 12, 4) and batch.y.shape == (5, 12) and batch.y.dtype == torch.int64
    mappings = set()
    for x, y in zip(batch.x, batch.y, strict=True):
        assert sorted(y.tolist()) == sorted([0, 1, 2] * 4)
        label_of = {int(c): int(lab) for c, lab in zip(x[:, 0], y, strict=True)}
        assert len(label_of) == 3 and len(set(label_of.values())) == 3  # one class per label
        assert len({(int(c), int(i)) for c, i in x[:, :2]}) == 12  # distinct examples
        mappings.add(tuple(sorted(label_of.items())))
    assert len(mappings) > 1  # classes and labels differ across sequences
    assert any(y.tolist() != sorted(y.tolist()) for y in batch.y)  # shuffled


def test_sequence_sampler_is_seedable_resumable_and_worker_invariant() -> None:
    data = class_data()

    def sampler(seed: int = 3) -> SequenceSampler:
        return SequenceSampler(data, 3, 4, meta_batch=2, seed=seed)

    first = sampler()
    batches = [first.sample() for _ in range(4)]
    again = sampler()
    again.load_state_dict({"seed": 3, "batches": 2})
    for a, b in zip([again.sample(), again.sample()], batches[2:], strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert first.state_dict() == {"seed": 3, "batches": 4}
    assert not torch.equal(sampler(seed=4).sample().y, batches[0].y)
    loader = DataLoader(sampler(), batch_size=None, num_workers=2)
    for a, b in zip(loader, batches, strict=False):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_sequence_sampler_names_a_class_with_too_few_instances() -> None:
    data = class_data(classes=4, per_class=3)
    with pytest.raises(ValueError, match=r"class '0' has 3 examples but instances = 5 \(and 3 more classes are too small\)"):
        SequenceSampler(data, n_way=3, instances=5, meta_batch=2)
    with pytest.raises(ValueError, match=r"n_way = 5 but the dataset has only 4 classes"):
        SequenceSampler(data, n_way=5, instances=2, meta_batch=2)
    with pytest.raises(ValueError, match=r"instances must be >= 1, got 0"):
        SequenceSampler(data, n_way=3, instances=0, meta_batch=2)


BAD_MODELS = [
    (dict(read_heads=11), r"read_heads must be <= memory_rows .* got read_heads=11, memory_rows=10"),
    (dict(gamma=1.5), r"gamma \(the usage decay\) must be in \[0, 1\], got 1.5"),
    (dict(memory_rows=-1), r"memory_rows must be >= 0, got -1"),
    (dict(memory_width=0), r"memory_width must be >= 1, got 0"),
]


@pytest.mark.parametrize(("change", "match"), BAD_MODELS)
def test_bad_sizes_raise(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pymeta.MANN(5, 3, **{**SMALL, **change})


def test_bad_inputs_raise() -> None:
    mann, (x, y) = model("mann", input_dim=784), sequences()
    with pytest.raises(ValueError, match=r"input_dim = 784 but the examples of x have 5 features \(x of shape \(3, 12, 5\)"):
        mann(x, y)
    x = torch.rand(3, 12, 1, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"y must have the \[T, S\] = \(3, 12\) dims of x, got shape \(3, 11\)"):
        mann(x, y[:, :11])
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 3\) .* got y\[0, 4\] = 3"):
        mann(x, torch.where(torch.arange(12) == 4, 3, y))
    with pytest.raises(TypeError, match=r"x must have the dtype of the model's parameters, torch.float64, got torch.float32"):
        mann(x.float(), y)
    with pytest.raises(ValueError, match=r"input_dim = 784 but the examples of support_x have 9 features"):
        mann.episode(torch.rand(3, 4, 9, dtype=torch.float64), y[:, :4], torch.rand(3, 2, 9, dtype=torch.float64))


def test_the_command_refuses_data_without_classes() -> None:
    with pytest.raises(ValueError, match=r"--algo mann learns from sequences of a class data set .* got --data 'sinusoid'"):
        training.build(training.TrainConfig(algo="mann", data="sinusoid").resolved())


@pytest.mark.parametrize("algo", ["mann", "lstm"])
def test_pymeta_train_and_eval_print_per_instance_accuracy(algo: str, tmp_path, capsys) -> None:
    out = tmp_path / "m.pt"
    args = ["train", "--algo", algo, "--data", "glyphs", "--iterations", "2", "--meta-batch", "2", "--val-every", "2",
            "--val-episodes", "2", "--eval-episodes", "4", "--out", str(out), "--no-progress", "--plot"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    print(printed)
    line = r"per-instance accuracy: 1st \d\.\d\d, 2nd \d\.\d\d, 5th \d\.\d\d, 10th \d\.\d\d \(95% CI ± \d\.\d\d or less, 4 test sequences\)"
    assert re.search(line, printed)
    assert ("MANN" if algo == "mann" else "LSTM without memory") in printed
    assert out.with_suffix(".png").stat().st_size > 0
    assert main(["eval", "--checkpoint", str(out), "--no-progress"]) == 0
    assert re.search(line, capsys.readouterr().out)


def test_mann_is_a_learner_of_the_command() -> None:
    assert LEARNERS["mann"] is LEARNERS["lstm"] is pymeta.MANN
    assert pymeta.MANN(5, 3, **SMALL).inner_steps is None
    config = training.TrainConfig(algo="lstm").resolved()
    assert (config.ways, config.shots) == (5, 10)


def test_resume_continues_the_sequence_stream_exactly(tmp_path) -> None:
    def run(name: str, iterations: int, resume: str | None = None) -> training.Result:
        config = training.TrainConfig(algo="lstm", data="glyphs", iterations=iterations, meta_batch=2, val_every=2,
                                      val_episodes=2, eval_episodes=2, out=str(tmp_path / f"{name}.pt"))
        return training.train(config, progress=False, log=lambda line: None, resume=resume)

    full = run("full", 4)
    run("part", 2)
    resumed = run("part", 4, resume=str(tmp_path / "part-last.pt"))
    assert resumed.losses == full.losses[2:]
