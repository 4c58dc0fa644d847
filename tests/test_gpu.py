"""The fused ops and MAML on a GPU, with each GPU backend forced (marker ``gpu``).

Every op on CUDA tensors with the ``triton`` and the ``cuda`` backend forced (the
switch ``PYMETA_BACKEND`` sets): outputs and input gradients against the float64
reference on the CPU, within twice PyTorch's own error at that precision (the reference's
PyTorch ops run on the same GPU inputs, plus one unit in the last place), float64
``gradcheck`` and ``gradgradcheck`` on the GPU; then second-order MAML and Meta-SGD with a
BatchNorm model on CUDA against the float64 per-task ``autograd.grad`` reference.

Without a CUDA device the ``gpu`` cases are skipped (tests/conftest.py); the ``cpu-cpp``
cases run the same checks on the C++ backend so that CI exercises this file's code.
``benchmarks/gpu_check.sh`` runs the ``gpu`` cases on a GPU, with ``TRITON_INTERPRET=0``
(the interpreter would run the Triton kernels in numpy and test nothing of the GPU code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from conftest import report
from helpers import classification_episode, conv_bn, reference_meta_grads, relative_error

import pymeta
from pymeta.ops import force_backend, inner_sgd, memory_access, proto_logits, prototypes
from pymeta.ops._backends import triton_interpreting, unavailable_reason

# (device, backend): the GPU backends, and the C++ backend to run this file's code in CI.
PLACES = [pytest.param(("cuda", b), id=f"cuda-{b}", marks=pytest.mark.gpu) for b in ("triton", "cuda")]
PLACES.append(pytest.param(("cpu", "cpp"), id="cpu-cpp"))
T = 3


@pytest.fixture(params=PLACES)
def place(request: pytest.FixtureRequest) -> tuple[torch.device, str]:
    """``(device, backend)`` with ``backend`` forced for the test; skipped with the reason
    if it cannot run here."""
    device, backend = torch.device(request.param[0]), request.param[1]
    reason = unavailable_reason(backend, device)
    if backend == "triton" and triton_interpreting():
        reason = "TRITON_INTERPRET=1 would run the Triton kernels in the interpreter: run with TRITON_INTERPRET=0"
    if reason is not None:
        pytest.skip(f"{backend} on {device}: {reason}")
    with force_backend(backend):
        yield device, backend


def _inner_sgd(per_element: bool, small: bool) -> tuple[Callable[..., list[torch.Tensor]], list[torch.Tensor]]:
    shapes = [(2, 5), (2, 3, 1), (2,)] if small else [(T, 1601), (T, 40, 1), (T, 7, 5, 3, 3), (T,)]
    n = len(shapes)
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    if not per_element:
        return lambda *x: inner_sgd(list(x[:n]), list(x[n:]), 0.37), [*params, *grads]
    rates = [torch.rand(s[1:], dtype=torch.float64) + 0.1 for s in shapes]
    return lambda *x: inner_sgd(list(x[:n]), list(x[n : 2 * n]), list(x[2 * n :])), [*params, *grads, *rates]


def _prototypes(small: bool) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    tasks, n_way, shots, dim = (2, 3, 2, 7) if small else (T, 5, 3, 1601)
    labels = torch.stack([torch.randperm(n_way * shots) % n_way for _ in range(tasks)])
    support = torch.randn(tasks, n_way * shots, dim, dtype=torch.float64)
    return lambda s, y: prototypes(s, y, n_way), [support, labels]


def _proto_logits(metric: str, small: bool) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    tasks, queries, n_way, dim = (2, 4, 3, 7) if small else (T, 75, 5, 1601)
    query = torch.randn(tasks, queries, dim, dtype=torch.float64)
    protos = torch.randn(tasks, n_way, dim, dtype=torch.float64)
    return lambda q, p: proto_logits(q, p, metric), [query, protos]


def _memory_access(small: bool) -> tuple[Callable[..., tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    tasks, rows, width, heads = (2, 5, 3, 2) if small else (T, 37, 13, 3)
    # Distinct usages, exact in half precision: the least-used rows are the same in every dtype.
    usage = torch.stack([torch.randperm(rows) for _ in range(tasks)]) / 8
    inputs = [torch.randn(tasks, rows, width), usage, torch.softmax(torch.randn(tasks, heads, rows), -1),
              torch.randn(tasks, heads, width), torch.randn(tasks, heads, width), torch.rand(tasks, heads)]
    return lambda *x: tuple(memory_access(*x)), [x.double() for x in inputs]


# name -> builder(small): (op as a function of its inputs, float64 CPU inputs of odd shapes)
OPS = {
    "inner_sgd-float-lr": lambda small: _inner_sgd(False, small),
    "inner_sgd-per-element-lr": lambda small: _inner_sgd(True, small),
    "prototypes": _prototypes,
    **{f"proto_logits-{m}": (lambda small, m=m: _proto_logits(m, small)) for m in ("sqeuclidean", "euclidean", "cosine")},
    "memory_access": _memory_access,
}


def _outputs_and_grads(fn: Callable[..., object], inputs: Sequence[torch.Tensor], grad_seed: int) -> list[torch.Tensor]:
    """``fn``'s outputs, then the gradients of their dot product with fixed random
    cotangents w.r.t. every floating-point input."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    g = torch.Generator().manual_seed(grad_seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    wrt = [x for x in leaves if x.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, wrt, cotangents))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_op_matches_float64_reference(place: tuple[torch.device, str], op: str, dtype: torch.dtype) -> None:
    device, backend = place
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("on CPU one dtype exercises this test's code; the op tests cover the C++ backend")
    fn, inputs = OPS[op](False)
    cast = [x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in inputs]
    got = _outputs_and_grads(fn, cast, grad_seed=1)
    with force_backend("reference"):
        exact = _outputs_and_grads(fn, inputs, grad_seed=1)  # float64 on the CPU
        plain = _outputs_and_grads(fn, cast, grad_seed=1)  # PyTorch's ops at this precision, same device
    for k, (g, e, p) in enumerate(zip(got, exact, plain, strict=True)):
        report(f"{op} {backend} {dtype} result {k}", g.cpu(), e)
        err = (g.double().cpu() - e).abs().max().item()
        torch_err = (p.double().cpu() - e).abs().max().item()
        ulp = torch.finfo(g.dtype).eps * e.abs().max().item()
        assert g.shape == e.shape and g.device.type == device.type
        assert err <= 2 * torch_err + ulp, f"result {k}: error {err:.3e}, PyTorch's {torch_err:.3e}"


@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck_and_gradgradcheck(place: tuple[torch.device, str], op: str) -> None:
    device, _ = place
    fn, inputs = OPS[op](True)
    leaves = tuple(x.to(device).requires_grad_(x.is_floating_point()) for x in inputs)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("strategy", ["lowered", "vmap", "loop"])
@pytest.mark.parametrize("algo", ["maml", "metasgd"])
def test_meta_gradient_on_device_matches_float64_reference(
    place: tuple[torch.device, str], algo: str, strategy: str
) -> None:
    """Second order, 2 steps, a conv net with BatchNorm (what vmap gets wrong)."""
    device, backend = place
    if device.type == "cpu" and strategy != "loop":
        pytest.skip("on CPU one strategy exercises this test's code; test_maml and test_metasgd cover the rest")
    model, episode = conv_bn().double(), classification_episode()
    cls = pymeta.MetaSGD if algo == "metasgd" else pymeta.MAML
    learner = cls(model, lr=0.3, steps=2, loss_fn=F.cross_entropy, strategy=strategy)
    wrt = list(learner.parameters())  # the model's, then (Meta-SGD) the lrs
    extra = wrt[len(list(model.parameters())) :]
    lr = dict(zip(dict(model.named_parameters()), extra, strict=True)) if extra else 0.3
    expected = reference_meta_grads(model, episode, F.cross_entropy, lr, 2, also=extra)  # on the CPU
    learner.to(device)
    sx, sy, qx, qy = (t.to(device) for t in episode)
    pred = learner.episode(sx, sy, qx)
    loss = sum(F.cross_entropy(p, y) for p, y in zip(pred, qy, strict=True))
    grads = [g.cpu() for g in torch.autograd.grad(loss, wrt)]
    err = relative_error(grads, expected)
    print(f"{algo} {strategy} on {device} ({backend}): relative error {err:.3e}")
    assert err < 1e-10
