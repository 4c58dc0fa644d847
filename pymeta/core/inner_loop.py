"""The batched inner loop shared by every gradient-based meta-learner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pymeta import _validate
from pymeta.core.batched import FastWeights, LossFn, TaskBatched
from pymeta.core.norms import Stats
from pymeta.ops import inner_sgd
from pymeta.ops._backends import capturing

InnerLR = float | Tensor | Sequence[Tensor]
Aux = TypeVar("Aux")


def trainable(weights: FastWeights, leaf: bool = False) -> FastWeights:
    """Fast weights the inner loop can differentiate even when autograd is off outside.

    Under ``torch.no_grad()`` (evaluation) the expanded meta-parameters carry no graph,
    and fresh weights (``leaf=True``, e.g. FineTune's zero heads) never had one:
    detached copies that require grad let the eager inner loop take its gradients.
    Inside ``torch.compile`` the inner loop differentiates with ``torch.func.grad``,
    which needs no ``requires_grad`` (and a traced graph cannot return tensors made to
    require it), so the weights are returned as they are.
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and not leaf):
        return weights
    return {n: w.detach().requires_grad_() for n, w in weights.items()}


def inner_loop(
    batched: TaskBatched,
    weights: FastWeights,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    lr: InnerLR,
    steps: int,
    first_order: bool,
    strategy: str,
    check_finite: bool = False,
    checkpoint: bool = False,
    *,
    extra: FastWeights | None = None,
    record: list[Stats] | None = None,
    first_step: int = 0,
) -> FastWeights:
    """Take ``steps`` SGD steps on every task's loss at once.

    Args:
        weights: ``{name: [T, *shape]}`` fast weights to adapt.
        x: support inputs ``[T, S, ...]``; ``y``: support targets ``[T, S, ...]``, checked
            against the first predictions (:func:`pymeta._validate.targets`).
        lr: float, per-task ``[T]``, or one per-element tensor per adapted weight.
        first_order: drop the second-order terms (inner gradients are constants).
        check_finite: raise ``FloatingPointError`` naming the task and step when a task's
            loss or gradient is NaN or infinite (:func:`check_finite_step`). Off by
            default: the check reads the values, one device sync per inner step.
        checkpoint: second order only: keep each step's fast weights, not its graph, and
            recompute the step in ``backward`` (:class:`_CheckpointedStep`). Memory per
            step drops from a support forward+backward graph to one set of weights; the
            cost is one more support forward and backward per step.
        extra: ``{name: [T, ...]}`` tensors the model runs with but the loop does not
            adapt (e.g. MAML++'s per-step BatchNorm weights and running statistics; see
            :meth:`TaskBatched.forward`); they are differentiated through like ``lr``.
        record: a list: each step appends the batch statistics of its support forward
            (``TaskBatched.forward``'s ``record``), returned out of the gradient
            transform, so this also works under ``torch.compile``.
        first_step: the index of the first step (for messages and the one-time target
            check): a learner whose steps differ (MAML++) calls this once per step.

    The loss summed over tasks has, w.r.t. task t's fast weights, exactly task t's own
    gradient (tasks share no fast weight), so one ``autograd.grad`` call serves all T.
    With ``create_graph`` the update stays differentiable: the meta-gradient is the
    full second-order one.
    """
    weights = trainable(weights)
    create_graph = not first_order and torch.is_grad_enabled()
    names = list(weights)
    values = [weights[n] for n in names]
    extra = extra or {}

    def step_fn(
        step: int, values: list[Tensor], lr: InnerLR, extra: FastWeights, create_graph: bool, record: list[Stats] | None
    ) -> list[Tensor]:
        def summed_loss(values: list[Tensor]) -> tuple[Tensor, tuple[Tensor, Stats]]:
            stats: Stats = {}
            pred = batched.forward({**extra, **dict(zip(names, values, strict=True))}, x, strategy,
                                   None if record is None else stats)
            if step == 0:  # shapes do not change between steps
                _validate.targets("support_y", pred, y, loss_fn)
            losses = batched.losses(loss_fn, pred, y, strategy)
            return losses.sum(), (losses, stats)

        grads, (losses, stats) = task_gradients(summed_loss, values, create_graph)
        if record is not None:
            record.append(stats)
        if check_finite:
            check_finite_step(step, losses, dict(zip(names, grads, strict=True)))
        return inner_sgd(values, grads, lr)

    with torch.enable_grad():
        for step in range(first_step, first_step + steps):
            if checkpoint and create_graph and not torch.compiler.is_compiling():
                # Extra tensors without gradients (running statistics) are constants of the
                # step, held as they are: saving them would forbid their later in-place update.
                learned = {n: t for n, t in extra.items() if t.requires_grad}
                constants = {n: t for n, t in extra.items() if not t.requires_grad}
                values = list(_CheckpointedStep.apply(
                    step_fn, step, lr, record, constants, tuple(learned), len(values),
                    *values, *_lr_tensors(lr), *learned.values(),
                ))
            else:
                values = step_fn(step, values, lr, extra, create_graph, record)
    return dict(zip(names, values, strict=True))


def task_gradients(
    summed_loss: Callable[[list[Tensor]], tuple[Tensor, Aux]], values: list[Tensor], create_graph: bool
) -> tuple[list[Tensor], Aux]:
    """Gradients of ``summed_loss(values)[0]`` w.r.t. ``values``, and its aux output.

    Eager: one ``torch.autograd.grad``, with ``create_graph`` for second order. Inside
    ``torch.compile``: ``torch.func.grad``, whose result is differentiable at the outer
    level, so AOTAutograd traces the whole meta-step as one graph and differentiates it
    once (it cannot trace a double backward through ``autograd.grad(create_graph=True)``).
    Both give the same values; first order detaches the gradients either way. A weight
    the loss does not use (e.g. a head row never selected) gets a zero gradient.
    """
    if torch.compiler.is_compiling():
        grads, aux = torch.func.grad(summed_loss, has_aux=True)(values)
        return [g if create_graph else g.detach() for g in grads], aux
    loss, aux = summed_loss(values)
    grads = torch.autograd.grad(loss, values, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(values, grads, strict=True)], aux


def _lr_tensors(lr: InnerLR) -> list[Tensor]:
    """The tensors of an ``InnerLR`` (none for a float), in a fixed order."""
    if isinstance(lr, Tensor):
        return [lr]
    return [] if isinstance(lr, int | float) else list(lr)


def _with_lr_tensors(lr: InnerLR, tensors: Sequence[Tensor]) -> InnerLR:
    """``lr`` with its tensors replaced by ``tensors`` (the inverse of :func:`_lr_tensors`)."""
    if isinstance(lr, Tensor):
        return tensors[0]
    return lr if isinstance(lr, int | float) else list(tensors)


class _CheckpointedStep(torch.autograd.Function):
    """One second-order inner step that stores its inputs, not its graph.

    ``forward`` takes the step without building a graph; ``backward`` rebuilds it from
    the saved fast weights (same RNG state, so dropout masks repeat) and returns the
    vector-Jacobian product for the weights, the learning-rate tensors and the ``extra``
    tensors that require grad, which includes the second-order (Hessian-vector) terms.
    """

    @staticmethod
    def forward(ctx, step_fn, step, lr, record, constants, extra_names, num_values, *inputs):
        ctx.step_fn, ctx.step, ctx.lr, ctx.num_values = step_fn, step, lr, num_values
        ctx.constants, ctx.extra_names = constants, extra_names
        ctx.rng = _rng_state(inputs[0].device)
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            detached = [t.detach() for t in inputs]
            for v in detached[:num_values]:
                v.requires_grad_()
            new = step_fn(step, *_CheckpointedStep._split(ctx, detached), False, record)
        return tuple(w.detach() for w in new)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        device = inputs[0].device
        with torch.enable_grad(), torch.random.fork_rng(devices=_cuda_devices(device)):
            _set_rng_state(device, ctx.rng)
            new = ctx.step_fn(ctx.step, *_CheckpointedStep._split(ctx, inputs), True, None)
        wanted = [t for t, original in zip(inputs, ctx.saved_tensors, strict=True) if original.requires_grad]
        grads = iter(torch.autograd.grad(new, wanted, grad_outputs, allow_unused=True))
        return (None, None, None, None, None, None, None, *(
            next(grads) if original.requires_grad else None for original in ctx.saved_tensors
        ))

    @staticmethod
    def _split(ctx, inputs: list[Tensor]) -> tuple[list[Tensor], InnerLR, FastWeights]:
        """``(values, lr, extra)`` from the flat inputs ``[*values, *lr tensors, *extra tensors]``."""
        num_extra = len(ctx.extra_names)
        values, rest = inputs[: ctx.num_values], inputs[ctx.num_values : len(inputs) - num_extra]
        extra = dict(zip(ctx.extra_names, inputs[len(inputs) - num_extra :], strict=True))
        return values, _with_lr_tensors(ctx.lr, rest), {**ctx.constants, **extra}


def _cuda_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def check_finite_step(step: int, losses: Tensor, grads: FastWeights) -> None:
    """Raise ``FloatingPointError`` if any task's loss or gradient is NaN or infinite.

    Args:
        step: the inner step (0-based), for the message.
        losses: per-task losses ``[T]``.
        grads: ``{name: [T, *shape]}`` per-task gradients of the fast weights.

    The message names the first bad task (its index in the task dim, 0-based) and, for
    a finite loss with a non-finite gradient, the weight. All tasks are checked with
    one device sync; the slow path that builds the message runs only on failure.
    """
    if capturing():
        raise RuntimeError(
            "check_finite reads the inner losses and gradients on the host, which a CUDA graph "
            "cannot capture: construct the learner with check_finite=False"
        )
    if torch.compiler.is_compiling():  # no host read inside a graph: an assertion instead
        finite = torch.stack([torch.isfinite(losses.detach()).all(),
                              *(torch.isfinite(g.detach()).all() for g in grads.values())]).all()
        torch._assert_async(finite, f"inner loop: step {step} has a non-finite loss or gradient (under "
                                    "torch.compile the task is not named: run eagerly to see it)")
        return
    bad_loss = ~torch.isfinite(losses.detach())  # [T]
    # [P, T]: whether weight p of task t has a non-finite gradient entry.
    bad_grad = torch.stack([~torch.isfinite(g.detach()).reshape(g.shape[0], -1).all(1) for g in grads.values()])
    if not (bad_loss.any() | bad_grad.any()):
        return
    task = int((bad_loss | bad_grad.any(0)).nonzero()[0])
    if bad_loss[task]:
        raise FloatingPointError(
            f"inner loop: task {task} step {step} has a non-finite loss ({losses[task].item()})"
        )
    name = list(grads)[int(bad_grad[:, task].nonzero()[0])]
    raise FloatingPointError(
        f"inner loop: task {task} step {step} has a non-finite gradient of {name!r} "
        f"(the loss is finite, {losses[task].item():.6g})"
    )
