"""pymeta.ops.proto_logits: every backend against float64 references, precision, edge cases and
errors (gradcheck, opcheck and the transforms: tests/test_ops.py)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import report
from op_cases import backend_params
from op_cases import exact_logits as exact

from pymeta.ops import force_backend, proto_logits
from pymeta.ops._backends import triton_interpreting, unavailable_reason

module = importlib.import_module("pymeta.ops.proto_logits")
METRICS = module.METRICS
CPU = torch.device("cpu")


BACKENDS = backend_params("reference", "cpp", "triton")


def shape_for(backend: str) -> tuple[int, int, int, int]:
    """Odd (T, Q, N, D); the Triton interpreter runs every program in numpy, so smaller."""
    return (2, 19, 5, 97) if backend == "triton" else (3, 75, 5, 1601)


def exact_grads(query: torch.Tensor, protos: torch.Tensor, grad: torch.Tensor, metric: str) -> tuple[torch.Tensor, ...]:
    q = query.detach().double().requires_grad_()
    p = protos.detach().double().requires_grad_()
    return torch.autograd.grad(exact(q, p, metric), (q, p), grad.double())


def run(backend: str, query: torch.Tensor, protos: torch.Tensor, metric: str, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q = query.detach().requires_grad_()
    p = protos.detach().requires_grad_()
    with force_backend(backend):
        out = proto_logits(q, p, metric)
        gq, gp = torch.autograd.grad(out, (q, p), grad)
    return out, gq, gp


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_exact(backend: str, metric: str, dtype: torch.dtype) -> None:
    T, Q, N, D = shape_for(backend)
    query, protos = torch.randn(T, Q, D, dtype=dtype), torch.randn(T, N, D, dtype=dtype)
    grad = torch.randn(T, Q, N, dtype=dtype)
    out, gq, gp = run(backend, query, protos, metric, grad)
    assert out.shape == (T, Q, N) and out.dtype == dtype and gq.dtype == dtype
    want = (exact(query, protos, metric), *exact_grads(query, protos, grad, metric))
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    for name, got, ref in zip(("logits", "grad_query", "grad_protos"), (out, gq, gp), want, strict=True):
        report(f"{backend} {metric} {dtype} {name}", got, ref)
        assert rel_err(got, ref) < tol


@pytest.mark.parametrize("metric", METRICS)
def test_reference_matches_cdist(metric: str) -> None:
    """The reference agrees with torch.cdist (float64), as easyfsl computes its scores."""
    query, protos = torch.randn(3, 75, 64, dtype=torch.float64), torch.randn(3, 5, 64, dtype=torch.float64)
    with force_backend("reference"):
        out = proto_logits(query, protos, metric)
    if metric == "cosine":
        want = torch.nn.functional.cosine_similarity(query.unsqueeze(2), protos.unsqueeze(1), dim=-1)
    else:
        dist = torch.cdist(query, protos, compute_mode="donot_use_mm_for_euclid_dist")
        want = -dist.square() if metric == "sqeuclidean" else -dist
    report(f"reference vs cdist {metric}", out, want)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_pytorch_error(backend: str, metric: str, dtype: torch.dtype) -> None:
    """Error vs float64 at most 2x that of PyTorch's own computation in the same dtype."""
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpreting():
        pytest.skip("the Triton interpreter truncates float32 -> bfloat16 stores (compiled kernels round "
                    "to nearest even), so the error measured here would be the interpreter's")
    T, Q, N, D = shape_for(backend)
    query, protos = torch.randn(T, Q, D).to(dtype), torch.randn(T, N, D).to(dtype)
    grad = torch.randn(T, Q, N).to(dtype)
    out, gq, gp = run(backend, query, protos, metric, grad)
    assert out.dtype == gq.dtype == gp.dtype == dtype
    want = (exact(query, protos, metric), *exact_grads(query, protos, grad, metric))
    # PyTorch's own: the explicit-difference formula evaluated in `dtype` with autograd.
    q, p = query.detach().requires_grad_(), protos.detach().requires_grad_()
    if metric == "cosine":
        own = torch.nn.functional.cosine_similarity(q.unsqueeze(2), p.unsqueeze(1), dim=-1)
    else:
        sq = (q.unsqueeze(2) - p.unsqueeze(1)).pow(2).sum(-1)
        own = -sq if metric == "sqeuclidean" else -sq.sqrt()
    own_grads = torch.autograd.grad(own, (q, p), grad)
    for name, got, mine_ref, theirs in zip(
        ("logits", "grad_query", "grad_protos"), (out, gq, gp), want, (own, *own_grads), strict=True
    ):
        report(f"{backend} {metric} {dtype} {name}", got, mine_ref)
        report(f"  pytorch {dtype} {name}", theirs, mine_ref)
        ours = (got.double() - mine_ref).abs().max()
        pytorch = (theirs.double() - mine_ref).abs().max()
        assert ours <= 2 * pytorch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_large_offset_stays_accurate_and_non_negative(backend: str, metric: str) -> None:
    """float32 features sharing a 1e4 offset: the naive expansion would lose every digit."""
    T, Q, N, D = shape_for(backend)
    offset = 1e4 * torch.randn(T, 1, D)
    protos = offset + torch.randn(T, N, D)
    query = torch.cat([offset + torch.randn(T, Q - 1, D), protos[:, :1]], dim=1)  # one exact hit
    grad = torch.randn(T, Q, N)
    out, gq, gp = run(backend, query, protos, metric, grad)
    want = (exact(query, protos, metric), *exact_grads(query, protos, grad, metric))
    for name, got, ref in zip(("logits", "grad_query", "grad_protos"), (out, gq, gp), want, strict=True):
        report(f"{backend} {metric} offset 1e4 {name}", got, ref)
        assert torch.isfinite(got).all()
        # Without care the error is ~eps * |q|^2 ~ 1e1 * D (useless); 1e-3 allows for the
        # sqrt at the exact hit, where |q - p|^2 ~ eps * |q - centre|^2 becomes ~sqrt(eps).
        assert rel_err(got, ref) < (1e-3 if metric == "euclidean" and name == "logits" else 1e-4)
    assert (out <= 0).all(), "a squared distance came out negative"
    assert out[:, -1, 0].abs().max() <= 1e-3 * out.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_gradient_at_zero_distance_is_finite(backend: str) -> None:
    protos = torch.randn(2, 3, 16, dtype=torch.float64)
    query = protos.clone()  # every query sits on a prototype
    q, p = query.requires_grad_(), protos.requires_grad_()
    with force_backend(backend):
        out = proto_logits(q, p, "euclidean")
        gq, gp = torch.autograd.grad(out.sum(), (q, p), create_graph=True)
        hess = torch.autograd.grad(gq.sum() + gp.sum(), (q, p), allow_unused=True)
    for g in (gq, gp, *hess):
        assert torch.isfinite(g).all()
    # At q == p_n the pair contributes 0; the other prototypes give the gradient.
    q1, p1 = protos[:, :1].detach().requires_grad_(), protos[:, :1].detach().clone().requires_grad_()
    with force_backend(backend):
        g1 = torch.autograd.grad(proto_logits(q1, p1, "euclidean").sum(), (q1, p1))
    assert all((g == 0).all() for g in g1)


def test_dtype_promotion() -> None:
    query, protos = torch.randn(2, 4, 8), torch.randn(2, 3, 8, dtype=torch.float64)
    out = proto_logits(query, protos)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, exact(query, protos, "sqeuclidean"))


BAD_INPUTS = [
    ((torch.randint(3, (2, 4, 8)), torch.randn(2, 3, 8), "sqeuclidean"), TypeError, r"query must be a floating-point tensor, got dtype torch.int64"),
    (([[0.0]], torch.randn(2, 3, 8), "sqeuclidean"), TypeError, r"query must be a torch.Tensor, got list"),
    ((torch.randn(4, 8), torch.randn(2, 3, 8), "sqeuclidean"), ValueError, r"query must have 3 dims \[T, Q, D\], got shape \(4, 8\)"),
    ((torch.randn(2, 4, 8), torch.randn(3, 8), "sqeuclidean"), ValueError, r"protos must have 3 dims \[T, N, D\], got shape \(3, 8\)"),
    ((torch.randn(2, 4, 8), torch.randn(3, 3, 8), "sqeuclidean"), ValueError, r"number of tasks T \(dim 0\): query has shape \(2, 4, 8\), protos has shape \(3, 3, 8\)"),
    ((torch.randn(2, 4, 8), torch.randn(2, 3, 9), "sqeuclidean"), ValueError, r"feature size D \(dim 2\): query has shape \(2, 4, 8\), protos has shape \(2, 3, 9\)"),
    ((torch.randn(2, 4, 8), torch.randn(2, 3, 8), "manhattan"), ValueError, r"metric must be one of \('sqeuclidean', 'euclidean', 'cosine'\), got 'manhattan'"),
    ((torch.randn(2, 4, 8), torch.randn(2, 3, 8, device="meta"), "cosine"), ValueError, r"one device, got query on cpu, protos on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("args", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise(backend: str, args: tuple, error: type, match: str) -> None:
    with force_backend(backend), pytest.raises(error, match=match):
        proto_logits(*args)


def test_cpp_kernel_checks_its_inputs() -> None:
    """Direct calls of the C++ op (bypassing the Python checks) fail cleanly too."""
    if unavailable_reason("cpp", CPU) is not None:
        pytest.skip(unavailable_reason("cpp", CPU))
    with pytest.raises(ValueError, match=r"must agree on T and D"):
        torch.ops.pymeta_cpu.proto_logits(torch.randn(2, 4, 8), torch.randn(2, 3, 9), 0, 1e-8)
    with pytest.raises(ValueError, match=r"metric index must be 0 \(sqeuclidean\)"):
        torch.ops.pymeta_cpu.proto_logits(torch.randn(2, 4, 8), torch.randn(2, 3, 8), 7, 1e-8)
    with pytest.raises(TypeError, match=r"query and protos must have one dtype"):
        torch.ops.pymeta_cpu.proto_logits(torch.randn(2, 4, 8), torch.randn(2, 3, 8).double(), 0, 1e-8)
