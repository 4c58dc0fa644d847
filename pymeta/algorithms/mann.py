"""MANN: the memory-augmented neural network of Santoro et al. 2016, batched over tasks.

"One-shot Learning with Memory-Augmented Neural Networks" (ICML 2016). An episode is one
sequence (:class:`pymeta.data.SequenceSampler`): at step ``t`` the network sees the
example ``x_t`` and the one-hot label of step ``t - 1`` and predicts the label of
``x_t``, so it learns to bind examples to labels in an external memory as the sequence
goes. The model, as in the paper and its reference implementation
(tristandeleu/ntm-one-shot, ``mann/model.py``):

* an LSTM controller whose input is ``[x_t, onehot(y_{t-1}), r_{t-1}]`` (the previous
  step's reads);
* from its state ``h_t`` one linear layer gives each of the H heads a key and an add
  vector (``tanh``) and a write gate (``sigmoid``);
* one memory step (:func:`pymeta.ops.memory_access`): least-recently-used write, then
  content-based reads (cosine similarity, softmax over the rows);
* the logits are a linear layer of ``[h_t, r_t]``.

A meta-batch of T sequences runs as one batch through every step (the loop over time
steps is inherent; there is none over tasks). ``memory_rows=0`` is the paper's LSTM
baseline: the same controller with no memory (``nn.LSTM`` over the whole sequence,
logits from ``h_t``).

Where the paper leaves a choice open, the reference code decides: the key and add
nonlinearities (``tanh``), the write gate per head, head ``h`` writing to the ``h``-th
least-used row (the paper's ``w^lu`` marks the H least-used rows without saying which
head takes which), the cosine as ``k.m / sqrt(|k|^2 |m|^2 + 1e-6)``, and the initial
state (memory filled with 1e-6, usage and read weights one-hot on row 0, reads and LSTM
state zero). Where they differ, this follows the reference too: Adam at 1e-3 in
``pymeta train`` (the paper: RMSprop at 1e-4, which learns far slower in a CPU budget).
Unlike both, weights start at PyTorch's default initialisation (the reference: Glorot
uniform), and there is no key strength (neither has one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _validate, _value_checks
from pymeta.algorithms.base import Learner
from pymeta.core.batched import LossFn
from pymeta.data.sequences import Sequences, SequenceSampler, instance_index
from pymeta.ops import memory_access
from pymeta.ops.memory_access import MemoryState, composite

if TYPE_CHECKING:
    from pymeta.training import DataSpec, Stats, TrainConfig

INITIAL_MEMORY = 1e-6  # ntm-one-shot's M_0
# Instances the command reports (as the paper's table: 1st, 2nd, 5th, 10th).
REPORTED_INSTANCES = (1, 2, 5, 10)


class _State(NamedTuple):
    h: Tensor  # [T, C] controller output
    c: Tensor  # [T, C] controller cell
    reads: Tensor  # [T, H * W]
    memory: Tensor  # [T, R, W]
    usage: Tensor  # [T, R]
    read_weights: Tensor  # [T, H, R]

    def repeat_interleave(self, n: int) -> _State:
        return _State(*(x.repeat_interleave(n, 0) for x in self))


class _StepWeight(torch.autograd.Function):
    """``base`` unchanged; its backward also gives ``weight`` its gradient over all steps.

    A recurrence multiplies ``z_t [T, K]`` by ``weight [K, F]`` at every step ``t`` and adds
    ``base[:, t]``. Done with the weight itself, autograd forms and accumulates one
    ``[K, F]`` weight gradient per step. Done with ``weight.detach()`` plus this identity on
    ``base``, whose gradient ``g [T, S, F]`` is each step's output gradient, the weight's
    gradient is one matmul ``sum_t z_t^T g_t`` at the end; ``steps`` is the list the loop
    appends each (detached) ``z_t`` to. First-order only (``z_t`` is detached).
    """

    @staticmethod
    def forward(ctx: Any, base: Tensor, weight: Tensor, steps: list[Tensor]) -> Tensor:
        ctx.steps = steps
        return base.view_as(base)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z = torch.stack(ctx.steps, 1)
        return grad, z.flatten(0, 1).T @ grad.flatten(0, 1), None


def ordinal(k: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``21st``."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


class MANN(Learner, cli=("mann", "lstm")):
    """Memory-augmented neural network; ``forward(x, y)`` gives the logits of every step.

    Args:
        input_dim: features per example (an example of any shape is flattened: 784 for
            ``[1, 28, 28]`` images).
        n_classes: N, the classes of a sequence (label input and logits).
        controller_size: hidden size of the LSTM controller.
        memory_rows: R memory rows; 0 gives the LSTM baseline (no memory, no reads).
        memory_width: W, the width of a memory row.
        read_heads: H heads; each reads, and writes to its own least-used row (H <= R).
        gamma: usage decay.
        fused: run each memory step as the fused op :func:`pymeta.ops.memory_access`
            (default), or as composite PyTorch ops (the same numbers, autograd through
            each op: the reference the op is tested and benchmarked against).

    ``pymeta train --algo mann`` trains it on sequences of the data set's training
    classes (``--ways`` classes x ``--shots`` instances) and reports accuracy per
    instance on held-out classes; ``--algo lstm`` trains the baseline. ``episode``
    serves ordinary few-shot episodes too: the support set is the sequence, and each
    query is predicted as one more step after it.
    """

    cli_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        kind: dict(ways=5, shots=10, meta_batch=16, iterations=3000, outer_lr=1e-3) for kind in ("glyphs", "folder")
    }
    metric_columns = "k-th instance of a class in the sequence"

    def __init__(
        self,
        input_dim: int,
        n_classes: int,
        controller_size: int = 200,
        memory_rows: int = 128,
        memory_width: int = 40,
        read_heads: int = 4,
        gamma: float = 0.95,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.input_dim = _validate.positive_int("input_dim", input_dim)
        self.n_classes = _validate.positive_int("n_classes", n_classes)
        _validate.positive_int("controller_size", controller_size)
        self.memory_rows = _validate.non_negative_int("memory_rows", memory_rows)
        self.memory_width = _validate.positive_int("memory_width", memory_width)
        self.read_heads = _validate.positive_int("read_heads", read_heads)
        if memory_rows and read_heads > memory_rows:
            raise ValueError(f"read_heads must be <= memory_rows (each head writes to its own least-used row), "
                             f"got read_heads={read_heads}, memory_rows={memory_rows}")
        self.gamma = _validate.positive_float("gamma", gamma, allow_zero=True)
        if self.gamma > 1:
            raise ValueError(f"gamma (the usage decay) must be in [0, 1], got {gamma}")
        self.fused = fused
        reads = read_heads * memory_width if memory_rows else 0
        self.controller = nn.LSTM(input_dim + n_classes + reads, controller_size, batch_first=True)
        if memory_rows:
            self.interface = nn.Linear(controller_size, read_heads * (2 * memory_width + 1))
        self.head = nn.Linear(controller_size + reads, n_classes)

    # ----------------------------------------------------------------------- forward
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits ``[T, S, n_classes]`` for sequences ``x: [T, S, ...]`` with labels ``y: [T, S]``.

        Step ``t`` sees ``x[:, t]`` and the one-hot ``y[:, t - 1]`` (zeros at ``t = 0``).
        """
        inputs = self._inputs(x, y, "x", "y")
        if not self.memory_rows:
            return self.head(self.controller(inputs)[0])
        features, _ = self._unroll(inputs, self._initial_state(inputs))
        return self.head(features)

    def episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits ``[T, Q, n_classes]``: the support set runs as a sequence, then each query
        is one more step from the state after it (with the last support label as input)."""
        _validate.episode(support_x, support_y, query_x, classification=True, model=self)
        support = self._inputs(support_x, support_y, "support_x", "support_y")
        T, Q = query_x.shape[:2]
        last = F.one_hot(support_y[:, -1].long(), self.n_classes).to(support.dtype)
        queries = torch.cat([query_x.flatten(2), last.unsqueeze(1).expand(T, Q, -1)], -1).reshape(T * Q, 1, -1)
        if not self.memory_rows:
            _, (h, c) = self.controller(support)
            out = self.controller(queries, (h.repeat_interleave(Q, 1), c.repeat_interleave(Q, 1)))[0]
        else:
            _, state = self._unroll(support, self._initial_state(support))
            out, _ = self._unroll(queries, state.repeat_interleave(Q))
        return self.head(out).view(T, Q, self.n_classes)

    def _inputs(self, x: Tensor, y: Tensor, x_name: str, y_name: str) -> Tensor:
        """``[T, S, input_dim + n_classes]``: each step's example and the previous step's label."""
        _validate.floating(x_name, x)
        _validate.ndim(x_name, x, range(2, 16), "[T, S, ...]")
        features = math.prod(x.shape[2:])
        if features != self.input_dim:
            raise ValueError(f"input_dim = {self.input_dim} but the examples of {x_name} have {features} features "
                             f"({x_name} of shape {tuple(x.shape)} = [T, S, ...])")
        _validate.integer(y_name, y)
        if tuple(y.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{y_name} must have the [T, S] = {tuple(x.shape[:2])} dims of {x_name}, "
                             f"got shape {tuple(y.shape)}")
        _validate.model_dtype(x_name, x, self)
        _value_checks.labels_in_range(y_name, y, self.n_classes)
        previous = F.one_hot(y[:, :-1].long(), self.n_classes).to(x.dtype)
        previous = F.pad(previous, (0, 0, 1, 0))  # no label before the first step
        return torch.cat([x.flatten(2), previous], -1)

    def _initial_state(self, inputs: Tensor) -> _State:
        T, R, W, H = inputs.shape[0], self.memory_rows, self.memory_width, self.read_heads
        zeros = inputs.new_zeros(T, self.controller.hidden_size)
        first_row = F.one_hot(torch.zeros(T, dtype=torch.long, device=inputs.device), R).to(inputs.dtype)
        return _State(zeros, zeros, inputs.new_zeros(T, H * W), inputs.new_full((T, R, W), INITIAL_MEMORY), first_row,
                      first_row.unsqueeze(1).expand(T, H, R))

    def _unroll(self, inputs: Tensor, state: _State) -> tuple[Tensor, _State]:
        """Run the memory model over ``inputs: [T, S, F]`` from ``state``:
        ``(features [T, S, controller_size + H * W], final state)``."""
        lstm = self.controller
        n_in, HW = inputs.shape[-1], self.read_heads * self.memory_width
        # The example/label part of every step's preactivation in one matmul; per step only
        # the reads and the recurrent state: [r_{t-1}, h_{t-1}] @ [W_r, W_hh]^T.
        recurrent = torch.cat([lstm.weight_ih_l0[:, n_in:], lstm.weight_hh_l0], 1).T
        T, S, H, W = *inputs.shape[:2], self.read_heads, self.memory_width
        z_steps: list[Tensor] = []
        h_steps: list[Tensor] = []
        pre = _StepWeight.apply(F.linear(inputs, lstm.weight_ih_l0[:, :n_in], lstm.bias_ih_l0 + lstm.bias_hh_l0),
                                recurrent, z_steps)
        interface_base = _StepWeight.apply(self.interface.bias.expand(T, S, -1), self.interface.weight.T, h_steps)
        recurrent, interface_weight = recurrent.detach(), self.interface.weight.detach().T
        access: Callable[..., MemoryState] = memory_access if self.fused else composite
        h, c, reads, memory, usage, read_weights = state
        outputs = []
        # unbind: one gradient op for all steps (slices would zero-fill a full gradient each).
        for pre_t, base_t in zip(pre.unbind(1), interface_base.unbind(1), strict=True):
            z = torch.cat([reads, h], 1)
            z_steps.append(z.detach())
            gates = torch.addmm(pre_t, z, recurrent)
            i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # nn.LSTM's gate order: i, f, g, o
            c = f * c + i * torch.tanh(gates[:, 2 * lstm.hidden_size : 3 * lstm.hidden_size])
            h = o * torch.tanh(c)
            h_steps.append(h.detach())
            interface = torch.addmm(base_t, h, interface_weight)
            keys, adds = torch.tanh(interface[:, : 2 * HW]).view(T, 2, H, W).unbind(1)
            step = access(memory, usage, read_weights, keys, adds, torch.sigmoid(interface[:, 2 * HW :]), self.gamma)
            reads, read_weights, memory, usage = step.reads.flatten(1), step.read_weights, step.memory, step.usage
            outputs.append(torch.cat([h, reads], 1))
        return torch.stack(outputs, 1), _State(h, c, reads, memory, usage, read_weights)

    # ------------------------------------------------------------ training and evaluation
    def train_step(self, batch: Sequences, loss_fn: LossFn) -> Tensor:
        """Cross-entropy (``loss_fn``) of every step's prediction, averaged over steps and tasks."""
        logits = self(batch.x, batch.y)
        loss = loss_fn(logits.flatten(0, 1), batch.y.flatten())
        loss.backward()
        return loss.detach()

    def task_metric(self, batch: Any, task: str) -> Tensor:
        """On :class:`Sequences`: accuracy per instance ``[T, L]`` (column ``k``: the
        predictions at each class's ``k + 1``-th appearance); on an episode: query accuracy."""
        if not isinstance(batch, Sequences):
            return super().task_metric(batch, task)
        logits = self(batch.x, batch.y)
        k = instance_index(batch.y, self.n_classes)
        L = batch.y.shape[1] // self.n_classes
        if int(k.max()) >= L:
            raise ValueError(f"per-instance accuracy needs every one of the n_classes = {self.n_classes} labels "
                             f"exactly L = {L} times in each sequence of y (shape {tuple(batch.y.shape)})")
        correct = (logits.argmax(-1) == batch.y).double()
        return correct.new_zeros(batch.y.shape[0], L).scatter_add_(1, k, correct) / self.n_classes

    def test_report(self, config: TrainConfig, test: Stats, before: Stats | None) -> str | None:
        if not test.columns:  # evaluated on episodes: the standard report
            return None
        shown = [k for k in REPORTED_INSTANCES if k <= len(test.columns)]
        per = ", ".join(f"{ordinal(k)} {test.columns[k - 1].mean:.2f}" for k in shown)
        ci = max(test.columns[k - 1].ci95 for k in shown)
        model = "MANN" if self.memory_rows else "LSTM without memory"
        return (f"test accuracy over all steps ({model}, {config.ways} classes x {config.shots} instances): {test}\n"
                f"per-instance accuracy: {per} (95% CI ± {ci:.2f} or less, {test.tasks} test sequences)")

    # ----------------------------------------------------------------- the pymeta command
    @classmethod
    def from_config(cls, config: TrainConfig, data: DataSpec) -> MANN:
        if data.make_dataset is None:
            raise ValueError(f"--algo {config.algo} learns from sequences of a class data set (--data glyphs or "
                             f"folder:PATH), got --data {config.data!r}")
        memory = {"memory_rows": 0} if config.algo == "lstm" else {}
        return cls(math.prod(data.example_shape), config.ways, **memory)

    @classmethod
    def training_batches(cls, config: TrainConfig, data: DataSpec) -> SequenceSampler:
        return cls._sequences(config, data, "train", config.seed)

    @classmethod
    def eval_batches(cls, config: TrainConfig, data: DataSpec, split: str, seed: int) -> Iterator[Sequences]:
        return iter(cls._sequences(config, data, split, seed))

    @staticmethod
    def _sequences(config: TrainConfig, data: DataSpec, split: str, seed: int) -> SequenceSampler:
        assert data.make_dataset is not None  # from_config refused such data
        return SequenceSampler(data.make_dataset(split), config.ways, config.shots, config.meta_batch, seed)
