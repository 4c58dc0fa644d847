"""One way to define a fused op: :class:`FusedOp` turns an op's math into a custom op.

An op file holds its math (a pure-PyTorch reference forward and, optionally, backward),
its input checks and its autograd formula; the kernels live in ``csrc/NAME.cpp``
(``pymeta_cpu::NAME``), ``csrc/NAME.cu`` (``pymeta_cuda::NAME``) and
``kernels/NAME.py`` (``forward`` / ``backward``), each taking the op's own arguments.
Everything else is made here, once for every op::

    def reference_forward(query: Tensor, support: Tensor, scale: float) -> Tensor: ...   # [T, Q, N]
    def reference_backward(grad: Tensor, query: Tensor, support: Tensor, scale: float
                           ) -> tuple[Tensor, Tensor]: ...   # differentiable torch ops

    def _setup_context(ctx, inputs, output):      # as torch.autograd.Function.setup_context
        query, support, scale = inputs
        ctx.save_for_backward(query, support)
        ctx.scale = scale

    def _vjp(ctx, grad):                          # as torch.autograd.Function.backward
        query, support = ctx.saved_tensors
        return (*_OP.backward(grad, query, support, ctx.scale), None)

    _OP = FusedOp(
        "relation_pairs", reference_forward,
        fake=lambda query, support, scale: query.new_empty(...),          # output metadata
        backward=reference_backward,
        backward_fake=lambda grad, query, support, scale: (query.new_empty(query.shape), ...),
        setup_context=_setup_context, vjp=_vjp,
        fold_tasks=True,                          # dim 0 of every tensor is an independent task
        kernels=("cpp",),                         # the backends that have a kernel (default: all)
    )

    def relation_pairs(query: Tensor, support: Tensor, scale: float = 1.0) -> Tensor:
        ...  # argument checks with clear errors (pymeta._validate)
        return _OP(query, support, scale)

Export the function from ``pymeta/ops/__init__.py`` and add an ``OpCase`` to
``tests/op_cases.py``: ``tests/test_ops.py`` then runs gradcheck, gradgradcheck,
``opcheck``, the ``torch.func`` transforms and ``torch.compile`` on it for every backend.
The references must return new tensors (never an input or a view of one) and mutate
nothing; ``opcheck`` fails otherwise.

What that defines:

* ``pymeta::NAME``, its schema inferred from ``reference``'s type hints, and
  ``pymeta::NAME_backward`` from ``backward``'s (``torch.library.infer_schema``); fake
  (meta) implementations for ``torch.compile``; the references as the implementation on
  any other device.
* On CPU and CUDA tensors, a kernel that picks the backend per call
  (:func:`pymeta.ops._backends.choose`): the fastest available one unless
  ``not_supported(backend, *args)`` / ``slower(backend, *args)`` give a reason to pass
  over it for these inputs, the reference otherwise. Each call is counted with its
  backend and reason (:func:`pymeta.ops.usage`, ``pymeta info --workload``).
* Autograd for ``pymeta::NAME`` registered on the op itself, from ``setup_context`` /
  ``vjp`` written as for ``torch.autograd.Function`` (``vjp`` gets one gradient per
  output, a list for a ``Tensor[]`` output, and returns one per input, a list or None
  for a ``Tensor[]`` input; ``ctx.needs_input_grad`` has the same structure). ``vjp``
  calls ``OP.backward(...)``: the fused backward kernel when nothing it is given
  requires grad, else ``backward`` itself as differentiable torch ops, so gradients of
  any order are exact (``create_graph=True``, ``torch.func.grad`` of ``torch.func.grad``).
* A ``torch.vmap`` rule for both ops: with ``fold_tasks`` the vmapped dim is folded into
  dim 0 (one kernel call for all), else the op runs once per vmapped index.

Why the autograd is wired this way (measured on torch 2.13.0 and 2.14.1, CPU, with a
one-line op; tests/test_ops.py keeps checking every op under every transform):

* ``custom_op.register_autograd`` fails under ``torch.func.grad``, ``vmap(grad)`` and
  ``grad(vmap)`` ("In order to use an autograd.Function with functorch transforms ...
  it must override the setup_context staticmethod"): pytorch/pytorch issues 168393,
  170834, 179652.
* A ``torch.autograd.Function`` around the custom op (pymeta's earlier design) works in
  eager mode under every transform, but not in ``torch.compile`` of ``torch.func.grad``:
  Dynamo inlines the Function's forward there (pytorch/pytorch issue 193279) and reaches
  the custom op's own autograd, which is the failing one above.
* What works under all of them (eager and compiled ``func.grad``, ``grad(grad)``,
  ``vmap(grad)``, ``grad(vmap)``, ``backward()``, double backward): an autograd kernel
  registered for the op's ``Autograd`` dispatch key that applies a single-level
  ``autograd.Function``, as functorch does for its own transform-local autograd nodes
  (the fix proposed upstream in pytorch/pytorch pull request 184974), with grad mode
  back on inside its forward so that an enclosing ``torch.func.grad`` level records the
  op as well (without that, grad of grad through an op's output was silently zero).
  That uses two private names, ``torch.autograd.function._SingleLevelFunction`` and
  ``torch._functorch.utils.enable_single_level_autograd_function``; tests run every op
  under every transform, so a torch release that changes them fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._C import DispatchKeySet
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction

from pymeta.ops import _backends, _vmap

_LIB = torch.library.Library("pymeta", "FRAGMENT")
BACKENDS_WITH_KERNELS = ("cpp", "cuda", "triton")
_DIFFERENTIABLE = "differentiable torch ops: a graph of this backward is being built"


class FusedOp:
    """``pymeta::name`` (+ ``pymeta::name_backward``) with dispatch, autograd and vmap.

    Args:
        name: op name; also the kernels' name (``pymeta_cpu::name``, ``pymeta.kernels.name``).
        reference: pure-PyTorch forward, type-annotated (the schema is inferred from it).
        fake: output metadata from input metadata (``new_empty``), for ``torch.compile``.
        backward: pure-PyTorch backward, type-annotated, differentiable; None when
            ``vjp`` needs no op of its own (e.g. it calls ATen).
        backward_fake: ``fake`` of ``backward``.
        setup_context, vjp: the autograd formula, as ``torch.autograd.Function``'s
            ``setup_context`` and ``backward`` (structure: see the module docstring).
        check, backward_check: input checks on metadata only (they also run on fake
            tensors), before every kernel of the forward / backward op.
        before_kernel: ``(backend, *args)`` checks a kernel does not do itself (e.g. on
            values), run before any non-reference forward kernel.
        not_supported: ``(backend, *args) -> reason | None``: the forward kernel of
            ``backend`` cannot take these inputs (forcing that backend raises the reason).
        backward_not_supported: the same for the backward kernel and its arguments.
        slower: ``(backend, *args) -> reason | None``: the automatic choice passes over
            ``backend`` for these inputs (forcing it still runs it).
        kernels: backends with a kernel for this op (and its backward, if any).
        fold_tasks: every tensor argument and output has independent tasks in dim 0:
            vmap folds the vmapped dim into it instead of calling the op once per index.
        uncapturable: why the GPU kernels cannot be captured in a CUDA graph, if so.
    """

    def __init__(
        self,
        name: str,
        reference: Callable[..., Any],
        fake: Callable[..., Any],
        *,
        backward: Callable[..., Any] | None = None,
        backward_fake: Callable[..., Any] | None = None,
        setup_context: Callable[[Any, tuple[Any, ...], Any], None],
        vjp: Callable[..., Any],
        check: Callable[..., None] | None = None,
        backward_check: Callable[..., None] | None = None,
        before_kernel: Callable[..., None] | None = None,
        not_supported: Callable[..., str | None] | None = None,
        backward_not_supported: Callable[..., str | None] | None = None,
        slower: Callable[..., str | None] | None = None,
        kernels: Sequence[str] = BACKENDS_WITH_KERNELS,
        fold_tasks: bool = False,
        uncapturable: str | None = None,
    ) -> None:
        unknown = set(kernels) - set(BACKENDS_WITH_KERNELS)
        if unknown:
            raise ValueError(f"kernels must be among {BACKENDS_WITH_KERNELS}, got {sorted(unknown)}")
        self.name, self.kernels = name, tuple(kernels)
        self._uncapturable = uncapturable
        self.op = self._define(name, reference, fake, check, fold_tasks, not_supported, slower, before_kernel)
        self.backward_op = None
        if backward is not None:
            if backward_fake is None:
                raise ValueError(f"{name}: backward needs backward_fake")
            self.backward_op = self._define(f"{name}_backward", backward, backward_fake, backward_check, fold_tasks,
                                            backward_not_supported)
            _LIB.impl(self.backward_op._opname, _differentiable_backward(self.backward_op, backward),
                      "Autograd", with_keyset=True)
        _LIB.impl(name, _Autograd(self.op, setup_context, vjp), "Autograd", with_keyset=True)

    def __call__(self, *args: Any) -> Any:
        """``pymeta::name`` on ``args`` (differentiable)."""
        return self.op(*args)

    def backward(self, *args: Any) -> Any:
        """``pymeta::name_backward``: the fused kernel, or ``backward`` when it must be differentiable."""
        assert self.backward_op is not None, f"{self.name} defines no backward op"
        return self.backward_op(*args)

    def _define(
        self, name: str, reference: Callable[..., Any], fake: Callable[..., Any],
        check: Callable[..., None] | None, fold_tasks: bool,
        not_supported: Callable[..., str | None] | None = None, slower: Callable[..., str | None] | None = None,
        before_kernel: Callable[..., None] | None = None,
    ) -> Any:
        _LIB.define(name + torch.library.infer_schema(reference, mutates_args=()))
        op = getattr(torch.ops.pymeta, name).default

        def checked(impl: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any) -> Any:
                check(*args)
                return impl(*args)

            return impl if check is None else run

        def dispatch(*args: Any) -> Any:
            if check is not None:
                check(*args)
            backend, reason = _backends.choose(
                _device(args), self.kernels,
                self._hook(not_supported, args), self._hook(slower, args), self._uncapturable,
            )
            _backends.record(name, backend, reason)
            if backend == "reference":
                return reference(*args)
            if before_kernel is not None:
                before_kernel(backend, *args)
            return _backends.run(backend, name, args)

        _LIB.impl(name, checked(reference), "CompositeExplicitAutograd")
        _LIB.impl(name, dispatch, "CPU")
        _LIB.impl(name, dispatch, "CUDA")
        torch.library.register_fake(f"pymeta::{name}", checked(fake), lib=_LIB)
        rule = _vmap.fold_tasks_rule(op) if fold_tasks else _vmap.loop_rule(op)
        torch.library.register_vmap(f"pymeta::{name}", rule, lib=_LIB)
        return op


    @staticmethod
    def _hook(hook: Callable[..., str | None] | None, args: tuple[Any, ...]) -> Callable[[str], str | None] | None:
        return None if hook is None else lambda backend: hook(backend, *args)


def _device(args: tuple[Any, ...]) -> torch.device:
    for arg in args:
        if isinstance(arg, Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], Tensor):
            return arg[0].device
    raise ValueError("a pymeta op needs at least one tensor argument")


def _below_autograd(op: Any, keyset: DispatchKeySet, args: tuple[Any, ...]) -> Any:
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _differentiable_backward(op: Any, reference: Callable[..., Any]) -> Callable[..., Any]:
    """Autograd kernel of a backward op: its reference when its result must be differentiable."""
    name = op._opname

    def kernel(keyset: DispatchKeySet, *args: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            _backends.record(name, "reference", _DIFFERENTIABLE)
            return reference(*args)
        return _below_autograd(op, keyset, args)

    return kernel


class _Layout:
    """Function.apply tracks tensors only among its own arguments, not inside lists: an op
    with ``Tensor[]`` arguments passes them flattened, with a spec to rebuild the lists.
    An op without (spec None) passes its arguments as they are."""

    def __init__(self, op: Any) -> None:
        self.kinds = tuple(_kind(a.type) for a in op._schema.arguments)
        self.has_lists = "list" in self.kinds
        self.list_output = len(op._schema.returns) == 1 and _kind(op._schema.returns[0].type) == "list"

    def flatten(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...] | None, Sequence[Any]]:
        """``(spec, flat)``: spec holds the non-tensor arguments and the list lengths."""
        if not self.has_lists:
            return None, args
        spec, tensors = [], []
        for kind, arg in zip(self.kinds, args, strict=True):
            if kind == "list":
                tensors.extend(arg)
                spec.append(len(arg))
            elif kind == "tensor":
                tensors.append(arg)
                spec.append(None)
            else:
                spec.append(arg)
        return tuple(spec), tensors

    def unflatten(self, spec: tuple[Any, ...] | None, flat: Sequence[Any], value: Any = None) -> tuple[Any, ...]:
        """The arguments back from :meth:`flatten` (non-tensor ones replaced by ``value`` if given)."""
        if spec is None:
            return tuple(flat)
        args, i = [], 0
        for kind, item in zip(self.kinds, spec, strict=True):
            if kind == "list":
                args.append(list(flat[i : i + item]))
                i += item
            elif kind == "tensor":
                args.append(flat[i])
                i += 1
            else:
                args.append(item if value is None else value)
        return tuple(args)

    def flat_grads(self, spec: tuple[Any, ...] | None, grads: tuple[Any, ...]) -> Sequence[Tensor | None]:
        """The gradients of the flat arguments from ``grads`` (one per argument, a list or None for lists)."""
        if spec is None:
            return grads
        flat: list[Tensor | None] = []
        for kind, item, grad in zip(self.kinds, spec, grads, strict=True):
            if kind == "list":
                flat.extend([None] * item if grad is None else grad)
            elif kind == "tensor":
                flat.append(grad)
        return flat


def _kind(schema_type: Any) -> str:
    text = str(schema_type)
    if text in ("Tensor", "Optional[Tensor]"):
        return "tensor"
    return "list" if text == "List[Tensor]" else "value"


class _Autograd:
    """Autograd kernel of a forward op: a single-level Function (see the module docstring)."""

    def __init__(self, op: Any, setup_context: Callable[..., None], vjp: Callable[..., Any]) -> None:
        self.op = op
        self.layout = layout = _Layout(op)

        def forward(spec: tuple[Any, ...] | None, keyset: DispatchKeySet, *flat: Any) -> Any:
            # apply() turned grad mode off; back on, as in a C++ op's autograd kernel, so
            # that an enclosing torch.func.grad level records the op too (grad of grad).
            with torch.enable_grad():
                out = _below_autograd(op, keyset, layout.unflatten(spec, flat))
            return tuple(out) if layout.list_output else out

        def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            spec, _, *flat = inputs
            ctx.spec = spec
            ctx.needs_input_grad = layout.unflatten(spec, ctx.needs_input_grad[2:], value=False)
            setup_context(ctx, layout.unflatten(spec, flat), list(output) if layout.list_output else output)

        def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
            result = vjp(ctx, list(grads)) if layout.list_output else vjp(ctx, *grads)
            result = result if isinstance(result, tuple) else (result,)
            return (None, None, *layout.flat_grads(ctx.spec, result))

        methods = {"forward": forward, "setup_context": setup, "backward": backward}
        # Named after the op: its nodes show as e.g. ``inner_sgdBackward`` in a grad_fn chain.
        self.function = type(op._opname, (_SingleLevelFunction,), {k: staticmethod(f) for k, f in methods.items()})

    def __call__(self, keyset: DispatchKeySet, *args: Any) -> Any:
        if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
            return _below_autograd(self.op, keyset, args)
        spec, flat = self.layout.flatten(args)
        with enable_single_level_autograd_function():
            out = self.function.apply(spec, keyset, *flat)
        return list(out) if self.layout.list_output else out
