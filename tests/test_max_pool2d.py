"""pymeta.ops.max_pool2d: exactly F.max_pool2d (values, gradients, second derivatives)."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from pymeta.ops.max_pool2d import max_pool2d


def with_ties(shape, dtype=torch.float32, seed=0):
    """ReLU'd values rounded to a coarse grid: many windows tie (all zeros, or equal maxima)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 2).round().relu()


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), ((2, 3), (1, 2))])
@pytest.mark.parametrize("shape", [(3, 5, 9, 11), (2, 64, 14, 14)])
def test_values_and_gradients_equal_f_max_pool2d_with_ties(shape, kernel, stride):
    x = with_ties(shape).requires_grad_()
    ours, theirs = max_pool2d(x, kernel, stride), F.max_pool2d(x, kernel, stride)
    assert torch.equal(ours, theirs)
    probe = torch.randn_like(theirs).requires_grad_()
    grads = [torch.autograd.grad((out * probe).sum(), x, create_graph=True)[0] for out in (ours, theirs)]
    assert torch.equal(grads[0], grads[1])  # same argmax on ties: the first in the window
    # Second order (what MAML differentiates): the input gradient is a scatter of the
    # probe by the argmax indices, so its derivative w.r.t. the probe is a gather.
    weights = torch.randn_like(x)
    second = [torch.autograd.grad((g * weights).sum(), probe)[0] for g in grads]
    assert torch.equal(second[0], second[1])


def test_nan_propagates_like_f_max_pool2d():
    x = with_ties((2, 3, 6, 6)).requires_grad_()
    with torch.no_grad():
        x[0, 1, 2, 3] = float("nan")
    ours, theirs = max_pool2d(x, 2), F.max_pool2d(x, 2)
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    g = [torch.autograd.grad(out.nansum(), x)[0] for out in (ours, theirs)]
    assert torch.equal(g[0], g[1])


def test_float64_gradcheck_and_gradgradcheck():
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)  # distinct values: no ties
    assert gradcheck(lambda t: max_pool2d(t, 2), (x,))
    assert gradgradcheck(lambda t: max_pool2d(t, (3, 2), (2, 2)), (x,))


def test_cases_outside_the_fast_path_fall_back_to_f_max_pool2d():
    x = with_ties((2, 4, 7, 7))
    for kwargs in (dict(padding=1), dict(dilation=2), dict(ceil_mode=True)):
        assert torch.equal(max_pool2d(x, 3, 2, **kwargs), F.max_pool2d(x, 3, 2, **kwargs)), kwargs
    out, idx = max_pool2d(x, 2, return_indices=True)
    ref_out, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    strided = x.transpose(2, 3)  # not contiguous
    assert torch.equal(max_pool2d(strided, 2), F.max_pool2d(strided, 2))
    assert torch.equal(max_pool2d(x[0], 2), F.max_pool2d(x[0], 2))  # 3-D input
