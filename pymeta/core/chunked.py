"""A meta-loss whose gradients are taken task chunk by task chunk, in the forward pass.

Batching all T tasks keeps all T tasks' graphs alive until ``backward()``: for conv nets
that is T times the memory of learn2learn's per-task ``loss.backward()``. Here the
tasks run in chunks; each chunk's graph is differentiated and freed at once, and the
returned scalar carries the accumulated gradients (the pattern of Liger-Kernel's fused
linear cross-entropy). Peak memory is one chunk's graph; no work is repeated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pymeta import _validate


def chunked_mean_loss(
    task_loss_sum: Callable[[slice], Tensor], num_tasks: int, task_chunk: int | None, params: Sequence[Tensor]
) -> Tensor:
    """``sum over chunks of task_loss_sum(chunk) / num_tasks``, differentiable w.r.t. ``params``.

    Args:
        task_loss_sum: ``fn(tasks: slice) -> scalar``, the summed loss of those tasks,
            computed from ``params`` (and anything else that needs no gradient).
        task_chunk: tasks per chunk (``None``: all at once).
        params: every tensor the loss needs gradients for.

    The result supports first derivatives only: its gradients are constants computed
    here, so a second differentiation (e.g. a Hessian-vector product through it) raises
    a RuntimeError instead of returning a wrong zero. Under ``torch.compile`` the tasks
    run as one chunk (``task_chunk`` is an eager memory option; see the code).
    """
    chunk = num_tasks if task_chunk is None else _validate.positive_int("task_chunk", task_chunk)
    if torch.compiler.is_compiling():
        # One graph for the whole meta-batch, which AOTAutograd differentiates (its
        # partitioner decides what the backward keeps): the chunk loop's autograd.grad
        # inside a forward is a graph break, and each chunk's slice a recompile (measured
        # on conv4 MAML with task_chunk=1: both, and a 30 s recompile on a later call).
        return task_loss_sum(slice(0, num_tasks)) / num_tasks
    chunks = [slice(start, min(start + chunk, num_tasks)) for start in range(0, num_tasks, chunk)]
    wanted = [p for p in params if p.requires_grad]
    if not torch.is_grad_enabled() or not wanted:
        return sum(task_loss_sum(tasks).detach() for tasks in chunks) / num_tasks
    return _ChunkedMeanLoss.apply(task_loss_sum, chunks, num_tasks, *wanted)


class _ChunkedMeanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, task_loss_sum, chunks, num_tasks, *params):
        total = None
        grads: list[Tensor | None] = [None] * len(params)
        with torch.enable_grad():
            for tasks in chunks:
                loss = task_loss_sum(tasks)
                chunk_grads = torch.autograd.grad(loss, params, allow_unused=True)
                for i, g in enumerate(chunk_grads):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
                total = loss.detach() if total is None else total + loss.detach()
        ctx.save_for_backward(*(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)))
        ctx.num_tasks = num_tasks
        return total / num_tasks

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        scale = grad_out / ctx.num_tasks
        return (None, None, None, *(scale * g for g in ctx.saved_tensors))
