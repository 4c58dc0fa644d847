"""The batched inner loop shared by every gradient-based meta-learner."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pymeta import _validate
from pymeta.core.batched import FastWeights, LossFn, TaskBatched
from pymeta.ops import inner_sgd
from pymeta.ops._backends import capturing

InnerLR = float | Tensor | Sequence[Tensor]


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

    The loss summed over tasks has, w.r.t. task t's fast weights, exactly task t's own
    gradient (tasks share no fast weight), so one ``autograd.grad`` call serves all T.
    With ``create_graph`` the update stays differentiable: the meta-gradient is the
    full second-order one.
    """
    weights = trainable(weights)
    create_graph = not first_order and torch.is_grad_enabled()
    names = list(weights)
    values = [weights[n] for n in names]

    def step_fn(step: int, values: list[Tensor], lr: InnerLR, create_graph: bool) -> list[Tensor]:
        def summed_loss(values: list[Tensor]) -> tuple[Tensor, Tensor]:
            pred = batched.forward(dict(zip(names, values, strict=True)), x, strategy)
            if step == 0:  # shapes do not change between steps
                _validate.targets("support_y", pred, y, loss_fn)
            losses = batched.losses(loss_fn, pred, y, strategy)
            return losses.sum(), losses

        grads, losses = task_gradients(summed_loss, values, create_graph)
        if check_finite:
            check_finite_step(step, losses, dict(zip(names, grads, strict=True)))
        return inner_sgd(values, grads, lr)

    with torch.enable_grad():
        for step in range(steps):
            if checkpoint and create_graph and not torch.compiler.is_compiling():
                lr_tensors = _lr_tensors(lr)
                values = list(_CheckpointedStep.apply(step_fn, step, lr, len(values), *values, *lr_tensors))
            else:
                values = step_fn(step, values, lr, create_graph)
    return dict(zip(names, values, strict=True))


def task_gradients(
    summed_loss: Callable[[list[Tensor]], tuple[Tensor, Tensor]], values: list[Tensor], create_graph: bool
) -> tuple[list[Tensor], Tensor]:
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
    vector-Jacobian product for the weights and the learning-rate tensors, which
    includes the second-order (Hessian-vector) terms.
    """

    @staticmethod
    def forward(ctx, step_fn, step, lr, num_values, *inputs):
        values, lr_tensors = list(inputs[:num_values]), inputs[num_values:]
        ctx.step_fn, ctx.step, ctx.lr, ctx.num_values = step_fn, step, lr, num_values
        ctx.rng = _rng_state(values[0].device)
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            detached = [v.detach().requires_grad_() for v in values]
            new = step_fn(step, detached, _with_lr_tensors(lr, [t.detach() for t in lr_tensors]), False)
        return tuple(w.detach() for w in new)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        values, lr_tensors = inputs[: ctx.num_values], inputs[ctx.num_values:]
        with torch.enable_grad(), torch.random.fork_rng(devices=_cuda_devices(values[0].device)):
            _set_rng_state(values[0].device, ctx.rng)
            new = ctx.step_fn(ctx.step, values, _with_lr_tensors(ctx.lr, lr_tensors), True)
        wanted = [t for t, original in zip(inputs, ctx.saved_tensors, strict=True) if original.requires_grad]
        grads = iter(torch.autograd.grad(new, wanted, grad_outputs, allow_unused=True))
        return (None, None, None, None, *(
            next(grads) if original.requires_grad else None for original in ctx.saved_tensors
        ))


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
