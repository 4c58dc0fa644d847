"""pymeta.ops.batch_norm_relu_pool: float32 accuracy of the C++ kernels; the backward op's
own derivatives (second and third order) and its double-backward kernel against the
reference. The forward's values, gradcheck, gradgradcheck, opcheck and the transforms:
tests/test_ops.py."""

import pytest
import torch
from helpers import needs_cpp
from op_cases import backend_params

from pymeta import ops
from pymeta.ops import _backends
from pymeta.ops.batch_norm_relu_pool import _BACKWARD, reference_double_backward, reference_forward


@needs_cpp
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_float32_error_stays_at_rounding_level_when_the_mean_dwarfs_the_spread(offset):
    """Activations with |mean| = 60 std, where statistics taken as E[x^2] - E[x]^2 in
    float32 would lose most of their digits: values and gradients stay within float32
    rounding of the float64 truth (ATen's float32 errors here: 1e-6 or less)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 12, 14, generator=g, dtype=torch.float64) * 0.5 + offset
    weight = torch.randn(5, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    grad = torch.randn(6, 5, 6, 7, generator=g, dtype=torch.float64)

    def value_and_grads(fn, dtype):
        args = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        out = fn(*args)
        return [out, *torch.autograd.grad(out, args, grad.to(dtype))]

    exact = value_and_grads(lambda *a: reference_forward(*a, None, None, 1e-5), torch.float64)
    with _backends.force_backend("cpp"):
        fused = value_and_grads(lambda *a: ops.batch_norm_relu_pool(*a, None, None, 1e-5), torch.float32)
    for name, got, want in zip(("out", "grad x", "grad weight", "grad bias"), fused, exact, strict=True):
        rel = ((got.double() - want).abs().max() / want.abs().max()).item()
        # float32 epsilon is 1.2e-7; at offset 30 rounding x itself moves x / std by 2e-6.
        assert rel < 2e-6, f"{name}: relative error {rel:.1e} vs float64"


# ------------------------------------------------ the backward as an op of its own
def backward_inputs(mode: str, width: int, zero_weight: bool = True) -> tuple:
    """Arguments of ``pymeta::batch_norm_relu_pool_backward``: an odd height and ``width``
    (7, 11, 19: the kernel's plain loop, chunks of 4 and of 8 windows), weights of both
    signs and one of 0 unless not ``zero_weight`` (the window choice on maxima, minima and
    the first element; finite differences cannot straddle 0, where the choice jumps), and
    ``out`` from the forward, so its ReLU mask is the real one."""
    g = torch.Generator().manual_seed(width)
    C = 4
    x = torch.rand(2, C, 5, width, generator=g, dtype=torch.float64)
    weight = torch.tensor([1.5, -0.8, 0.0 if zero_weight else 0.3, 0.6], dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    running = (None, None) if mode == "train" else (torch.randn(C, generator=g, dtype=torch.float64),
                                                     torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    out = reference_forward(x, weight, bias, *running, 1e-5)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    return (grad, x, out, weight, bias, *running, 1e-5)


MODES_AND_WIDTHS = [(mode, width) for mode in ("train", "eval") for width in (7, 11, 19)]


def differentiable_backward(mode: str, width: int) -> tuple:
    """The backward op as a function of (grad, x, weight), and those inputs; out and bias
    only move the piecewise-constant choices and ReLU mask, which get no gradient."""
    grad, x, out, weight, bias, *rest = backward_inputs(mode, width, zero_weight=False)

    def backward(grad, x, weight):
        return _BACKWARD(grad, x, out, weight, bias, *rest)

    return backward, tuple(t.requires_grad_() for t in (grad, x, weight))


@pytest.mark.parametrize(("mode", "width"), MODES_AND_WIDTHS)
@pytest.mark.parametrize("backend", backend_params("reference", "cpp"))
def test_backward_op_vjp_is_exact(mode, width, backend):
    """gradcheck of the backward op checks its vjp, the double backward (the C++ kernel
    or the reference): what a second-order meta-gradient runs."""
    backward, inputs = differentiable_backward(mode, width)
    with _backends.force_backend(backend):
        assert torch.autograd.gradcheck(backward, inputs)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_op_third_derivative_is_exact(mode):
    """gradgradcheck of the backward op: the double backward's own derivative (the
    reference's autograd graph, whatever the backend; fast mode: random projections)."""
    backward, inputs = differentiable_backward(mode, 7)
    assert torch.autograd.gradgradcheck(backward, inputs, fast_mode=True)


@needs_cpp
@pytest.mark.parametrize(("mode", "width"), MODES_AND_WIDTHS)
def test_double_backward_kernel_equals_its_reference(mode, width):
    args = backward_inputs(mode, width)
    g = torch.Generator().manual_seed(1)
    grads = (torch.randn(args[1].shape, generator=g, dtype=torch.float64),
             torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
    want = reference_double_backward(*grads, *args)
    got = torch.ops.pymeta_cpu.batch_norm_relu_pool_backward_backward(*grads, *args)
    for name, a, b in zip(("d grad", "d x", "d weight"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    torch.library.opcheck(torch.ops.pymeta.batch_norm_relu_pool_backward_backward.default, (*grads, *args))


@needs_cpp
def test_double_backward_float32_error_stays_at_rounding_level():
    """The second-order path in float32, |mean| = 60 std: the double backward's sums are
    taken centred, as the backward's, so its error stays at float32 rounding too."""
    g = torch.Generator().manual_seed(0)
    args = list(backward_inputs("train", 19))
    args[1] = args[1] * 0.5 + 30.0
    args[2] = reference_forward(args[1], args[3], args[4], None, None, 1e-5)
    grads = (torch.randn(args[1].shape, generator=g, dtype=torch.float64),
             torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
    want = reference_double_backward(*grads, *args)
    as32 = [t.float() if isinstance(t, torch.Tensor) else t for t in (*grads, *args)]
    got = torch.ops.pymeta_cpu.batch_norm_relu_pool_backward_backward(*as32)
    for name, a, b in zip(("d grad", "d x", "d weight"), got, want, strict=True):
        rel = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert rel < 2e-6, f"{name}: relative error {rel:.1e} vs float64"
