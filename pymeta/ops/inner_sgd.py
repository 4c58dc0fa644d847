"""Fused inner-loop SGD: ``[p - lr * g for p, g in zip(params, grads)]`` in one kernel.

The inner loop of MAML-style algorithms updates every fast-weight tensor of every task;
with fast weights shaped ``[T, *param.shape]`` that is one small elementwise op per
tensor (two, with the ``lr * g`` temporary). :func:`inner_sgd` does the whole list in one
pass: one kernel launch per dtype on GPU (Triton or CUDA), one parallel region on CPU (C++).

Custom ops, made by :class:`pymeta.ops._factory.FusedOp` from the references below:

* ``pymeta::inner_sgd(Tensor[] params, Tensor[] grads, Tensor[] lr, float scale) -> Tensor[]``
  computes ``out[k] = params[k] - scale * lr[k] * grads[k]``; an empty ``lr`` means the
  constant rate ``scale`` alone. ``lr[k]`` broadcasts to ``params[k]`` per task and/or
  per element: shape ``()``, ``s``, ``(1, *s)``, ``(T, 1, ..., 1)`` or ``(T, *s)`` for
  ``params[k]: [T, *s]``, in dtype ``promote_types(params[k].dtype, float32)`` (rates are
  never rounded to half precision). Outputs are contiguous with the params' dtypes.
  Params and grads may be any strided views, e.g. MAML's ``p.expand(T, ...)``: kernels
  read a stride-0 task dim in place.
* ``pymeta::inner_sgd_backward(grad_outs, grads, lr, scale, need_grads, need_lr)``
  returns ``(grad_grads, grad_lr)``: ``-scale * lr[k] * grad_outs[k]`` and
  ``-scale * sum(grads[k] * grad_outs[k])`` reduced to ``lr[k]``'s shape, in one pass
  (each list empty when not needed). The params' gradient is ``grad_outs`` itself.

Small CPU calls (at most :data:`COMPOSITE_MAX_NUMEL` elements in all, no backend forced)
skip the op and run :func:`reference_forward` as plain differentiable torch ops: for
them the op's fixed per-call cost exceeds the work of the fused kernel.

While a CUDA graph is captured the GPU kernels step aside for the reference: their
launchers upload a table of tensor addresses from host memory per call, which a graph
cannot replay (a graph also removes the launch cost the table exists to save).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pymeta import _validate
from pymeta.ops import _backends
from pymeta.ops._factory import FusedOp

# A table rather than functools.cache (which torch.compile warns about tracing through):
# this runs per tensor per call, and promote_types is a dispatched op.
_ACC = {dtype: torch.promote_types(dtype, torch.float32) for dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                                        torch.float64)}


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Compute (and lr) dtype for params of ``dtype``: float32 at least, float64 kept."""
    return _ACC.get(dtype) or torch.promote_types(dtype, torch.float32)


def _lr_shape_ok(rate: Tensor, param: Tensor) -> bool:
    """Whether ``rate`` broadcasts to ``param: [T, *s]`` per task and/or per element."""
    if param.dim() == 0 or rate.dim() > param.dim():
        return rate.dim() == 0
    padded = (1,) * (param.dim() - rate.dim()) + tuple(rate.shape)
    return padded[0] in (1, param.shape[0]) and (
        padded[1:] == tuple(param.shape[1:]) or all(n == 1 for n in padded[1:])
    )


def _check(
    params: list[Tensor], grads: list[Tensor], lr: list[Tensor], names: tuple[str, str] = ("params", "grads")
) -> None:
    """The op's input contract (see the module docstring), with errors naming the argument."""
    pname, gname = names
    _validate.same_length((pname, gname), params, grads)
    if lr:
        _validate.same_length((pname, "lr"), params, lr)
    device = params[0].device if params else None
    for k, (p, g) in enumerate(zip(params, grads, strict=True)):
        # Fast path first: this runs on every call, the named checks only to explain a failure.
        ok = (
            isinstance(p, Tensor) and isinstance(g, Tensor) and p.is_floating_point()
            and g.shape == p.shape and g.dtype == p.dtype and p.device == device and g.device == device
        )
        if lr:
            r = lr[k]
            ok = ok and isinstance(r, Tensor) and r.dtype == _acc(p.dtype) and r.device == device
            ok = ok and _lr_shape_ok(r, p)
        if not ok:
            _explain(k, p, g, lr[k] if lr else None, params[0], names)


def _explain(k: int, p: Tensor, g: Tensor, rate: Tensor | None, first: Tensor, names: tuple[str, str]) -> None:
    """Raise the error for entry ``k`` that failed :func:`_check`'s fast path."""
    pname, gname = names
    _validate.floating(f"{pname}[{k}]", p)
    _validate.floating(f"{gname}[{k}]", g)
    _validate.same_shape((f"{pname}[{k}]", f"{gname}[{k}]"), p, g)
    _validate.same_dtype((f"{pname}[{k}]", f"{gname}[{k}]"), p, g)
    tensors = {f"{pname}[0]": first, f"{pname}[{k}]": p, f"{gname}[{k}]": g}
    if rate is not None:
        _validate.floating(f"lr[{k}]", rate)
        if rate.dtype != _acc(p.dtype):
            raise TypeError(
                f"lr[{k}] must have dtype {_acc(p.dtype)} (rates of {p.dtype} params[{k}] are applied "
                f"in float32, or float64 for float64 params), got {rate.dtype}"
            )
        if not _lr_shape_ok(rate, p):
            rest = tuple(p.shape[1:])
            per_element = f"{rest} to match params[{k}] (without its task dim), or " if p.dim() else ""
            raise ValueError(
                f"lr[{k}] must have shape {per_element}{tuple(p.shape)} (one rate per task and element) "
                f"or () (one rate for the whole tensor), got {tuple(rate.shape)}"
            )
        tensors[f"lr[{k}]"] = rate
    _validate.same_device(tensors)


def reference_forward(params: list[Tensor], grads: list[Tensor], lr: list[Tensor], scale: float) -> list[Tensor]:
    """Pure PyTorch ``[params[k] - scale * lr[k] * grads[k]]`` (the op contract above)."""
    outs = []
    for k, (p, g) in enumerate(zip(params, grads, strict=True)):
        acc = _acc(p.dtype)
        if lr:
            out = torch.addcmul(p.to(acc), lr[k], g.to(acc), value=-scale)
        else:
            out = torch.add(p.to(acc), g.to(acc), alpha=-scale)
        outs.append(out.to(p.dtype).contiguous())
    return outs


def reference_backward(
    grad_outs: list[Tensor], grads: list[Tensor], lr: list[Tensor], scale: float, need_grads: bool, need_lr: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """``(grad_grads, grad_lr)`` of the forward, from differentiable torch ops.

    ``grad_grads[k] = -scale * lr[k] * grad_outs[k]`` (``[T, *s]``, params' dtype) and
    ``grad_lr[k] = -scale * sum(grads[k] * grad_outs[k])`` summed to ``lr[k].shape``; a list
    is empty when not needed. Also the backward of a ``create_graph=True`` pass.
    """
    grad_grads, grad_lr = [], []
    for k, go in enumerate(grad_outs):
        acc = _acc(go.dtype)
        if need_grads:
            rate = lr[k] * -scale if lr else -scale
            grad_grads.append((go.to(acc) * rate).to(go.dtype).contiguous())
        if need_lr and lr:
            prod = grads[k].to(acc) * go.to(acc)
            grad_lr.append((prod.sum_to_size(lr[k].shape) * -scale).contiguous())
    return grad_grads, grad_lr


def _check_backward(
    grad_outs: list[Tensor], grads: list[Tensor], lr: list[Tensor], scale: float, need_grads: bool, need_lr: bool
) -> None:
    # Without lr gradients the grads are never read, and the caller need not keep them.
    _check(grad_outs, grads if need_lr else grad_outs, lr, names=("grad_outs", "grads"))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    _, grads, lr, ctx.scale = inputs
    needs = ctx.needs_input_grad
    ctx.need_grads, ctx.need_lr = any(needs[1]), any(needs[2])
    # grads only matter for the lr gradient; lr for the grads' gradient (and lr's shapes).
    ctx.n = len(grads)
    ctx.save_for_backward(*(grads if ctx.need_lr else ()), *lr)
    # Unused outputs get None instead of a zero tensor, and cost nothing in backward.
    ctx.set_materialize_grads(False)


def _vjp(ctx: Any, grad_outs: list[Tensor | None]) -> tuple[Any, ...]:
    n, saved = ctx.n, ctx.saved_tensors
    grads, lr = (saved[:n], saved[n:]) if ctx.need_lr else ((), saved)
    grad_grads: list[Tensor | None] = [None] * n
    grad_lr: list[Tensor | None] = [None] * len(lr)
    live = [k for k, go in enumerate(grad_outs) if go is not None]
    if live and (ctx.need_grads or ctx.need_lr):
        gg, glr = _OP.backward(
            [grad_outs[k] for k in live],
            [grads[k] for k in live] if ctx.need_lr else [],
            [lr[k] for k in live] if lr else [],
            ctx.scale, ctx.need_grads, ctx.need_lr,
        )
        for i, k in enumerate(live):
            if ctx.need_grads:
                grad_grads[k] = gg[i]
            if ctx.need_lr:
                grad_lr[k] = glr[i]
    # d out / d params is the identity: the params' gradient is grad_out itself.
    return grad_outs, grad_grads, grad_lr, None


def _fake_backward(
    grad_outs: list[Tensor], grads: list[Tensor], lr: list[Tensor], scale: float, need_grads: bool, need_lr: bool
) -> tuple[list[Tensor], list[Tensor]]:
    grad_grads = [go.new_empty(go.shape) for go in grad_outs] if need_grads else []
    return grad_grads, [r.new_empty(r.shape) for r in lr] if need_lr else []


_OP = FusedOp(
    "inner_sgd", reference_forward,
    fake=lambda params, grads, lr, scale: [p.new_empty(p.shape) for p in params],
    backward=reference_backward, backward_fake=_fake_backward,
    setup_context=_setup_context, vjp=_vjp,
    check=lambda params, grads, lr, scale: _check(params, grads, lr), backward_check=_check_backward,
    uncapturable="the inner_sgd GPU kernels upload a host-memory address table per call",
)


def _lr_list(lr: float | Tensor | Sequence[Tensor], params: list[Tensor]) -> tuple[list[Tensor], float]:
    """The user's ``lr`` as the op's ``(lr, scale)``: one rate tensor per param in its compute dtype."""
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return [], float(lr)
    if isinstance(lr, Tensor):
        rate = _validate.floating("lr", lr)
        if rate.dim() > 1:
            raise ValueError(
                "lr must be a float, a 0-dim tensor, a [T] tensor of per-task rates or a list of one "
                f"tensor per param, got a tensor of shape {tuple(rate.shape)}"
            )
        for k, p in enumerate(params):
            if rate.dim() == 1 and (p.dim() == 0 or p.shape[0] != rate.shape[0]):
                raise ValueError(
                    f"lr of shape {tuple(rate.shape)} holds one rate per task, so params[{k}] must have "
                    f"{rate.shape[0]} tasks in its leading dim, got shape {tuple(p.shape)}"
                )
        # One cast per compute dtype and one [T, 1, ..., 1] view per param rank, shared.
        views: dict[tuple[torch.dtype, int], Tensor] = {}
        out = []
        for p in params:
            key = (_acc(p.dtype), p.dim())
            if key not in views:
                cast = rate.to(key[0])
                views[key] = cast.view(-1, *(1,) * (p.dim() - 1)) if rate.dim() else cast
            out.append(views[key])
        return out, 1.0
    if isinstance(lr, (list, tuple)):
        _validate.same_length(("params", "lr"), params, lr)
        rates = [_validate.floating(f"lr[{k}]", r) for k, r in enumerate(lr)]
        return [r if r.dtype == _acc(p.dtype) else r.to(_acc(p.dtype)) for p, r in zip(params, rates, strict=True)], 1.0
    raise TypeError(f"lr must be a float, a tensor or a list of tensors, got {type(lr).__name__}")


def inner_sgd(
    params: Sequence[Tensor], grads: Sequence[Tensor], lr: float | Tensor | Sequence[Tensor]
) -> list[Tensor]:
    """One SGD step on a list of (task-batched) tensors: ``[p - lr * g]``, fused.

    Args:
        params: tensors ``[T, *s_k]`` (typically the fast weights of all T tasks); any
            strides, e.g. ``p.unsqueeze(0).expand(T, ...)`` of the shared initial weights.
        grads: tensors shaped and typed like ``params`` (never None: substitute zeros).
        lr: the learning rate(s):

            * a float: one rate for everything (MAML);
            * a 0-dim tensor: one learnable rate for everything;
            * a ``[T]`` tensor: one rate per task, broadcast over each param's trailing dims;
            * a list with one tensor per param, shaped ``s_k`` (Meta-SGD's per-element
              rates, shared by every task), ``[T, *s_k]`` (per task and element) or ``()``
              (per tensor, e.g. MAML++'s per-layer rates).

    Returns:
        ``[p - lr * g]``: new contiguous tensors ``[T, *s_k]`` in the params' dtypes,
        computed in ``promote_types(dtype, float32)``. Differentiable (to any order)
        w.r.t. params, grads and tensor rates.
    """
    params = _validate.tensor_list("params", params)
    grads = _validate.tensor_list("grads", grads)
    _validate.same_length(("params", "grads"), params, grads)
    if not all(isinstance(p, Tensor) for p in params):  # dtypes and the rest: the op checks them
        for k, p in enumerate(params):
            _validate.tensor(f"params[{k}]", p)
    if not params:
        return []
    rates, scale = _lr_list(lr, params)
    if _composite_is_faster(params):
        _check(params, grads, rates)
        if not torch.compiler.is_compiling():  # traced, a count would be a guard: a recompile per call
            _backends.record("inner_sgd", "reference", _COMPOSITE)
        return reference_forward(params, grads, rates, scale)
    return _OP(params, grads, rates, scale)


# Below this many elements in total (all tensors of one call), on CPU with no backend
# forced, the update runs as plain differentiable torch ops: the custom op's fixed cost
# (dispatcher, autograd.Function, ~50-100 us per call and again in backward) then
# exceeds the whole fused kernel's work. Sinusoid MLP (25 tasks x 1.7k weights): ~10%
# of a meta-step. benchmarks/bench_inner_sgd.py measures both sides.
COMPOSITE_MAX_NUMEL = 1 << 16
_COMPOSITE = f"at most {COMPOSITE_MAX_NUMEL} elements on CPU: plain torch ops, cheaper than the op call"


def _composite_is_faster(params: list[Tensor]) -> bool:
    if _backends.forced_backend() is not None or params[0].device.type != "cpu":
        return False
    return sum(p.numel() for p in params) <= COMPOSITE_MAX_NUMEL
