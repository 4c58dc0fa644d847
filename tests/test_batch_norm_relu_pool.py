"""pymeta.ops.batch_norm_relu_pool: float32 accuracy of the C++ kernel; values against the
reference, gradcheck, gradgradcheck, opcheck and the transforms: tests/test_ops.py."""

import pytest
import torch
from helpers import needs_cpp

from pymeta import ops
from pymeta.ops import _backends
from pymeta.ops.batch_norm_relu_pool import reference_forward


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
