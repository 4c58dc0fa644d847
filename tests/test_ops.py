"""What every fused op must pass, on every backend that runs here (cases: tests/op_cases.py).

float64 gradcheck and gradgradcheck; ``torch.library.opcheck`` of the forward and
backward custom ops, also on inputs that require grad; ``torch.func.grad``,
grad of grad, ``vmap``, ``vmap(grad)`` and ``grad(vmap)`` against the same math in plain
torch; ``torch.compile`` (fullgraph, so no graph break) with eager-equal results and
gradients, also of a ``torch.func.grad`` inside the compiled function (how a compiled
meta-step takes its inner gradients); and the backend each call ran on, with its reason.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import report
from op_cases import CASES, OpCase, backend_params
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from pymeta import ops
from pymeta.ops._backends import unavailable_reason

CPU = torch.device("cpu")
TOL = {"rtol": 1e-10, "atol": 1e-12}


WITH_BACKENDS = [
    pytest.param(case, *param.values, id=f"{case.id}-{param.values[0]}", marks=param.marks)
    for case in CASES for param in backend_params(*case.backends)
]


def leaves(out: Any) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else list(out)


def loss(out: Any) -> Tensor:
    """A scalar with non-zero second derivatives through every output (ops may be linear)."""
    return sum((o.sin() * (i + 1)).sum() for i, o in enumerate(leaves(out)))


def exact_grads(case: OpCase, inputs: tuple[Tensor, ...], order: int) -> tuple[Tensor, ...]:
    """Gradients of ``loss(exact)`` (order 1) or of the squared norm of those (order 2)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    grads = torch.autograd.grad(loss(case.exact(*xs)), xs, create_graph=order == 2)
    if order == 2:
        grads = torch.autograd.grad(sum(g.square().sum() for g in grads), xs, materialize_grads=True)
    return grads


def assert_close(name: str, got: Any, want: Any) -> None:
    for a, b in zip(leaves(got), leaves(want), strict=True):
        report(name, a, b)
        torch.testing.assert_close(a, b, **TOL)


def batch(case: OpCase, size: int = 2) -> list[Tensor]:
    """``size`` independent draws of the case's inputs, stacked in a new leading dim."""
    return [torch.stack(parts) for parts in zip(*(case.inputs() for _ in range(size)), strict=True)]


@pytest.mark.parametrize(("case", "backend"), WITH_BACKENDS)
def test_gradcheck_and_gradgradcheck(case: OpCase, backend: str) -> None:
    inputs = tuple(x.requires_grad_() for x in case.inputs())
    fast = backend == "triton"  # every numerical probe is an interpreted kernel launch
    with ops.force_backend(backend):
        assert torch.autograd.gradcheck(case.fn, inputs, fast_mode=fast)
        assert torch.autograd.gradgradcheck(case.fn, inputs, fast_mode=fast)


class OpCalls(TorchDispatchMode):
    """The first call of every pymeta custom op seen below autograd: ``name -> (op, args)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, tuple[Any, tuple[Any, ...]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pymeta":
            self.calls.setdefault(func.name(), (func, args))
        return func(*args, **(kwargs or {}))


def _fresh(args: tuple[Any, ...], requires_grad: bool) -> tuple[Any, ...]:
    def copy(x: Any) -> Any:
        if isinstance(x, list):
            return [copy(t) for t in x]
        if not isinstance(x, Tensor):
            return x
        return x.detach().clone().requires_grad_(requires_grad and x.is_floating_point())

    return tuple(copy(a) for a in args)


@pytest.mark.parametrize(("case", "backend"), WITH_BACKENDS)
def test_opcheck_forward_and_backward_ops(case: OpCase, backend: str) -> None:
    """opcheck every custom op a forward + backward of the case calls, with the arguments it got."""
    inputs = tuple(x.requires_grad_() for x in case.inputs())
    seen = OpCalls()
    with ops.force_backend(backend), seen:
        torch.autograd.grad(loss(case.fn(*inputs)), inputs)
    op_name = case.id.split("-")[0]
    assert f"pymeta::{op_name}" in seen.calls, sorted(seen.calls)
    with ops.force_backend(backend):
        for name, (op, args) in seen.calls.items():
            for requires_grad in (False, True):
                print(name, "requires_grad" if requires_grad else "")
                torch.library.opcheck(op, _fresh(args, requires_grad))


def f_of(case: OpCase) -> Any:
    """``loss`` of the case's op, and its argnums (every input)."""
    return (lambda *xs: loss(case.fn(*xs))), tuple(range(len(case.inputs())))


@pytest.mark.parametrize(("case", "backend"), WITH_BACKENDS)
def test_func_grad(case: OpCase, backend: str) -> None:
    inputs = case.inputs()
    f, argnums = f_of(case)
    with ops.force_backend(backend):
        got = torch.func.grad(f, argnums)(*inputs)
    assert_close("func.grad", got, exact_grads(case, inputs, 1))


@pytest.mark.parametrize(("case", "backend"), WITH_BACKENDS)
def test_func_grad_of_grad(case: OpCase, backend: str) -> None:
    inputs = case.inputs()
    f, argnums = f_of(case)

    def grad_norm(*xs: Tensor) -> Tensor:
        return sum(g.square().sum() for g in torch.func.grad(f, argnums)(*xs))

    with ops.force_backend(backend):
        got = torch.func.grad(grad_norm, argnums)(*inputs)
    assert_close("grad of grad", got, exact_grads(case, inputs, 2))


@pytest.mark.parametrize(("case", "backend"), WITH_BACKENDS)
def test_vmap(case: OpCase, backend: str) -> None:
    inputs, batched = case.inputs(), batch(case)
    with ops.force_backend(backend):
        mapped = torch.vmap(case.fn)(*batched)
        # Only the first input batched: the others are shared by every vmapped call.
        first_only = torch.vmap(case.fn, in_dims=(0, *(None,) * (len(inputs) - 1)))(batched[0], *inputs[1:])
    for b in range(len(batched[0])):
        assert_close(f"vmap [{b}]", [o[b] for o in leaves(mapped)], case.exact(*[x[b] for x in batched]))
        assert_close(f"vmap, shared inputs [{b}]", [o[b] for o in leaves(first_only)],
                     case.exact(batched[0][b], *inputs[1:]))


@pytest.mark.parametrize(("case", "backend"), WITH_BACKENDS)
def test_vmap_of_grad_and_grad_of_vmap(case: OpCase, backend: str) -> None:
    batched = batch(case)
    f, argnums = f_of(case)
    with ops.force_backend(backend):
        mapped_grads = torch.vmap(torch.func.grad(f, argnums))(*batched)
        grads_of_mapped = torch.func.grad(lambda *xs: loss(torch.vmap(case.fn)(*xs)), argnums)(*batched)
    for b in range(len(batched[0])):
        assert_close(f"vmap(grad) [{b}]", [g[b] for g in mapped_grads], exact_grads(case, [x[b] for x in batched], 1))
    stacked = [x.detach().clone().requires_grad_() for x in batched]
    per_call = [case.exact(*[x[b] for x in stacked]) for b in range(len(stacked[0]))]
    assert_close("grad(vmap)", grads_of_mapped, torch.autograd.grad(sum(loss(out) for out in per_call), stacked))


def _compile_params() -> list:
    """One case per op on its fastest kernel (a forced backend: tiny inner_sgd calls would
    skip the op), and tiny inner_sgd on the automatic choice: plain torch ops, traced."""
    cpp = unavailable_reason("cpp", CPU)
    backend = "cpp" if cpp is None else "reference"
    chosen = ("inner_sgd-mixed", "prototypes", "proto_logits-euclidean", "max_pool2d", "adaptive_max_pool2d",
              "relation_pairs-train", "memory_access")
    by_id = {case.id: case for case in CASES}
    return [*(pytest.param(by_id[i], backend, id=f"{i}-{backend}") for i in chosen),
            pytest.param(by_id["inner_sgd-mixed"], None, id="inner_sgd-mixed-auto")]


@pytest.mark.parametrize(("case", "backend"), _compile_params())
def test_torch_compile_equals_eager(case: OpCase, backend: str | None) -> None:
    """A compiled loss and its gradient, and a compiled torch.func.grad (how a compiled
    meta-step takes inner gradients) and its gradient (second order), equal eager ones;
    fullgraph: the op adds no graph break; a second call does not recompile. One compiled
    function does all four."""
    f, argnums = f_of(case)

    def f_and_grad_norm(*xs: Tensor) -> tuple[Tensor, Tensor]:
        return f(*xs), sum(g.square().sum() for g in torch.func.grad(f, argnums)(*xs))

    def value_and_grads(run: Any, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        xs = [x.clone().requires_grad_() for x in inputs]
        value, grad_norm = run(*xs)
        return value, grad_norm, *torch.autograd.grad(value, xs, retain_graph=True), *torch.autograd.grad(grad_norm, xs)

    torch._dynamo.reset()  # every case compiles the same code objects: start from no cache
    compiled = torch.compile(f_and_grad_norm, fullgraph=True)
    with ops.force_backend(backend):
        for call in range(2):  # new inputs of the same shapes: no recompile
            inputs = case.inputs()
            with torch.compiler.set_stance("fail_on_recompile" if call else "default"):
                got = value_and_grads(compiled, inputs)
            assert_close(f"compiled, call {call}", got, value_and_grads(f_and_grad_norm, inputs))


def _record(fn: Any) -> list[tuple[str, str, str, int]]:
    ops.reset_usage()
    fn()
    return ops.usage()


def test_usage_records_backend_and_reason() -> None:
    """pymeta.ops.usage(): which backend each op call ran on, and why."""
    if unavailable_reason("cpp", CPU) is not None:
        pytest.skip(f"needs the C++ extension: {unavailable_reason('cpp', CPU)}")
    wide, narrow = torch.rand(1, 2, 4, 20), torch.rand(1, 2, 4, 8)
    assert _record(lambda: ops.max_pool2d(wide, 2)) == [("max_pool2d", "cpp", "preferred for cpu tensors", 1)]
    ((name, backend, reason, calls),) = _record(lambda: ops.max_pool2d(narrow, 2))
    assert (name, backend, calls) == ("max_pool2d", "reference", 1)
    assert "cpp: planes narrower than 16 pool faster through ATen" in reason
    with ops.force_backend("cpp"):  # forced: the kernel runs although it is slower here
        assert _record(lambda: ops.max_pool2d(narrow, 2))[0][1:3] == ("cpp", "forced (PYMETA_BACKEND or force_backend)")
        with pytest.raises(RuntimeError, match=r"'cpp' was forced but cannot run here: the C\+\+ kernel takes "
                                               r"float32 and float64, got torch.float16"):
            ops.max_pool2d(narrow.half(), 2)
    with ops.force_backend("triton"):  # max_pool2d has no Triton kernel: its reference runs
        assert _record(lambda: ops.max_pool2d(wide, 2))[0][1:3] == ("reference", "triton forced, but this op has "
                                                                                "no triton kernel")
    ((name, backend, reason, _),) = _record(lambda: ops.inner_sgd([torch.randn(3, 4)], [torch.randn(3, 4)], 0.1))
    assert (name, backend) == ("inner_sgd", "reference") and "plain torch ops, cheaper than the op call" in reason
    x = torch.randn(2, 6, 4, requires_grad=True)
    labels = torch.tensor([[0, 1, 2] * 2] * 2)
    # create_graph: the backward op's input requires grad, so its differentiable reference runs.
    graph = _record(lambda: torch.autograd.grad(ops.prototypes(x, labels, 3).pow(3).sum(), x, create_graph=True))
    assert ("prototypes_backward", "reference", "differentiable torch ops: a graph of this backward is being built",
            1) in graph
    plain = _record(lambda: torch.autograd.grad(ops.prototypes(x, labels, 3).pow(3).sum(), x))
    assert ("prototypes_backward", "cpp", "preferred for cpu tensors", 1) in plain


def test_pymeta_info_prints_the_backend_each_op_of_a_workload_used(capsys) -> None:
    """`pymeta info --workload sinusoid`: the sinusoid MAML step never reaches a fused kernel."""
    from pymeta import cli

    assert cli.main(["info", "--workload", "sinusoid"]) == 0
    out = capsys.readouterr().out
    assert "op calls of one meta-step of sinusoid" in out
    # Columns as wide as the longest op name of the table.
    assert re.search(r"\n  inner_sgd +reference +1x  at most 65536 elements on CPU: plain torch ops, cheaper than "
                     r"the op call\n", out)


def test_an_op_without_kernels_runs_its_reference_and_says_why() -> None:
    """An op without kernels (grouped_conv2d: ATen's convolution) says its reference is not a fallback."""
    from pymeta.ops import _backends

    assert _backends.choose(torch.device("cpu"), ()) == (
        "reference", "the op has no kernels: its reference is its implementation")


def test_layouts_check_ndim_and_dims_named_alike() -> None:
    """pymeta._validate.layouts, the ops' shape checks: a letter may sit at other positions."""
    from pymeta import _validate

    a, b = torch.zeros(2, 3, 4), torch.zeros(4, 2)
    _validate.layouts({"a": (a, "[T, Q, D]"), "b": (b, "[D, T]")})
    with pytest.raises(ValueError, match=r"b must have 2 dims \[D, T\], got shape \(4,\)"):
        _validate.layouts({"a": (a, "[T, Q, D]"), "b": (torch.zeros(4), "[D, T]")})
    with pytest.raises(ValueError, match=r"a and b must agree on the feature size D \(dims 2 and 0\): "
                                         r"a has shape \(2, 3, 4\), b has shape \(5, 2\)"):
        _validate.layouts({"a": (a, "[T, Q, D]"), "b": (torch.zeros(5, 2), "[D, T]")})
