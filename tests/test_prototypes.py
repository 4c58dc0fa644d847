"""pymeta.ops.prototypes: every backend against a per-class loop, precision, errors (gradcheck,
opcheck and the transforms: tests/test_ops.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import report
from op_cases import backend_params, loop_means

from pymeta.ops import force_backend, proto_logits, prototypes
from pymeta.ops._backends import triton_interpreting

BACKENDS = backend_params("reference", "cpp", "triton")


def episode(T: int, N: int, K: int, D: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """support [T, N*K, D] with shuffled labels [T, N*K], K shots of each of N classes."""
    labels = torch.stack([torch.randperm(N * K) % N for _ in range(T)])
    return torch.randn(T, N * K, D).to(dtype), labels


def shape_for(backend: str) -> tuple[int, int, int, int]:
    """Odd (T, N, K, D); the Triton interpreter runs every program in numpy, so smaller."""
    return (2, 5, 3, 97) if backend == "triton" else (3, 5, 3, 1601)


def run(backend: str, support: torch.Tensor, labels: torch.Tensor, n_way: int, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = support.detach().requires_grad_()
    with force_backend(backend):
        out = prototypes(x, labels, n_way)
        (gx,) = torch.autograd.grad(out, x, grad)
    return out, gx


def exact_grad(support: torch.Tensor, labels: torch.Tensor, n_way: int, grad: torch.Tensor) -> torch.Tensor:
    x = support.detach().double().requires_grad_()
    return torch.autograd.grad(loop_means(x, labels, n_way), x, grad.double())[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_matches_loop(backend: str, dtype: torch.dtype, label_dtype: torch.dtype) -> None:
    T, N, K, D = shape_for(backend)
    support, labels = episode(T, N, K, D, dtype)
    labels = labels.to(label_dtype)
    grad = torch.randn(T, N, D, dtype=dtype)
    out, gx = run(backend, support, labels, N, grad)
    assert out.shape == (T, N, D) and out.dtype == gx.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for name, got, want in (("protos", out, loop_means(support, labels, N)), ("grad", gx, exact_grad(support, labels, N, grad))):
        report(f"{backend} {dtype} labels {label_dtype} {name}", got, want)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbalanced_shots_and_many_classes(backend: str) -> None:
    """Different counts per class and N > 64 (the Triton kernel tiles over classes)."""
    T, N, D = 2, 70, 33
    labels = torch.stack([torch.cat([torch.arange(N), torch.randint(N, (41,))])[torch.randperm(N + 41)] for _ in range(T)])
    support = torch.randn(T, N + 41, D, dtype=torch.float64)
    grad = torch.randn(T, N, D, dtype=torch.float64)
    out, gx = run(backend, support, labels, N, grad)
    report(f"{backend} unbalanced protos", out, loop_means(support, labels, N))
    torch.testing.assert_close(out, loop_means(support, labels, N), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gx, exact_grad(support, labels, N, grad), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_pytorch_error(backend: str, dtype: torch.dtype) -> None:
    """Error vs float64 at most 2x that of PyTorch's own per-class mean in the same dtype."""
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpreting():
        pytest.skip("the Triton interpreter truncates float32 -> bfloat16 stores (compiled kernels round "
                    "to nearest even), so the error measured here would be the interpreter's")
    T, N, K, D = shape_for(backend)
    support, labels = episode(T, N, K, D, dtype)
    grad = torch.randn(T, N, D).to(dtype)
    out, gx = run(backend, support, labels, N, grad)
    assert out.dtype == gx.dtype == dtype
    x = support.detach().requires_grad_()
    own = torch.stack([torch.stack([x[t][labels[t] == c].mean(0) for c in range(N)]) for t in range(T)])
    (own_grad,) = torch.autograd.grad(own, x, grad)
    for name, got, want, theirs in (
        ("protos", out, loop_means(support, labels, N), own),
        ("grad", gx, exact_grad(support, labels, N, grad), own_grad),
    ):
        report(f"{backend} {dtype} {name}", got, want)
        report(f"  pytorch {dtype} {name}", theirs, want)
        assert (got.double() - want).abs().max() <= 2 * (theirs.double() - want).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_protonet_head_matches_easyfsl_style_loss(backend: str) -> None:
    """prototypes -> proto_logits -> cross-entropy, gradients included, vs the plain torch head."""
    T, N, K, Q, D = 2, 5, 2, 7, 16
    support, labels = episode(T, N, K, D, torch.float64)
    query = torch.randn(T, Q, D, dtype=torch.float64)
    target = torch.randint(N, (T, Q))
    s1, q1 = support.clone().requires_grad_(), query.clone().requires_grad_()
    with force_backend(backend):
        logits = proto_logits(q1, prototypes(s1, labels, N), "euclidean")
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        got = torch.autograd.grad(loss, (s1, q1))
    s2, q2 = support.clone().requires_grad_(), query.clone().requires_grad_()
    want_logits = -torch.cdist(q2, loop_means(s2, labels, N))
    want_loss = F.cross_entropy(want_logits.flatten(0, 1), target.flatten())
    want = torch.autograd.grad(want_loss, (s2, q2))
    report(f"{backend} protonet loss", loss, want_loss)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _support() -> torch.Tensor:
    return torch.randn(2, 6, 4)


def _labels() -> torch.Tensor:
    return torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 0, 1, 2]])


BAD_INPUTS = [
    ((_support(), torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 3, 1, 2]]), 3), ValueError,
     r"labels must be in \[0, n_way\) = \[0, 3\), got labels\[1, 3\] = 3"),
    ((_support(), torch.tensor([[0, 1, 2, 0, 1, 2], [2, -1, 0, 0, 1, 2]]), 3), ValueError,
     r"labels must be in \[0, n_way\) = \[0, 3\), got labels\[1, 1\] = -1"),
    ((_support(), torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 0, 2, 2]]), 3), ValueError,
     r"class 1 has no example in task 1 of labels"),
    ((_support(), _labels().float(), 3), TypeError, r"labels must be an integer tensor of class labels, got dtype torch.float32"),
    ((_support().long(), _labels(), 3), TypeError, r"support must be a floating-point tensor, got dtype torch.int64"),
    ((torch.randn(6, 4), _labels(), 3), ValueError, r"support must have 3 dims \[T, S, D\], got shape \(6, 4\)"),
    ((_support(), _labels().flatten(), 3), ValueError, r"labels must have 2 dims \[T, S\], got shape \(12,\)"),
    ((torch.randn(3, 6, 4), _labels(), 3), ValueError, r"number of tasks T \(dim 0\): support has shape \(3, 6, 4\), labels has shape \(2, 6\)"),
    ((torch.randn(2, 5, 4), _labels(), 3), ValueError, r"number of support examples S \(dim 1\)"),
    ((_support(), _labels(), 0), ValueError, r"n_way must be >= 1, got 0"),
    ((_support(), _labels(), 3.0), TypeError, r"n_way must be an int, got float 3.0"),
    ((_support(), _labels().to("meta"), 3), ValueError, r"one device, got support on cpu, labels on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("args", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise(backend: str, args: tuple, error: type, match: str) -> None:
    with force_backend(backend), pytest.raises(error, match=match):
        prototypes(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_labels_raise_under_vmap(backend: str) -> None:
    """The value checks live in the op's kernels, so they also fire inside torch.vmap."""
    support = torch.randn(2, 2, 6, 4)
    labels = torch.stack([_labels(), torch.zeros(2, 6, dtype=torch.int64)])
    with force_backend(backend), pytest.raises(ValueError, match=r"class 1 has no example in task 2 of labels"):
        torch.vmap(lambda x, y: prototypes(x, y, 3))(support, labels)
