"""pymeta.ops.max_pool2d: exactly F.max_pool2d (values, gradients, second derivatives); gradcheck,
opcheck and the transforms: tests/test_ops.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_cpp
from torch.nn.modules.utils import _pair

from pymeta.ops.max_pool2d import max_pool2d


def with_ties(shape, dtype=torch.float32, seed=0):
    """ReLU'd values rounded to a coarse grid: many windows tie (all zeros, or equal maxima)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 2).round().relu()


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), ((2, 3), (1, 2))])
# Narrow planes take the channels-last path, planes >= CPP_MIN_WIDTH the C++ kernel.
@pytest.mark.parametrize("shape", [(3, 5, 9, 11), (2, 64, 14, 14), (2, 3, 15, 17), (2, 4, 28, 28)])
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


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,kernel,stride",
    [((2, 3, 28, 28), 2, 2), ((1, 2, 15, 17), 2, 2), ((3, 1, 16, 16), 3, 2), ((2, 2, 9, 20), (2, 3), (1, 2)),
     ((1, 1, 5, 5), 5, 1), ((1, 2, 2, 2), 2, 2)],
)
def test_cpp_kernel_equals_aten_bit_for_bit(dtype, shape, kernel, stride):
    x = with_ties(shape, dtype) - 1.0  # ties at 0 and -1, negatives too
    x.view(-1)[:: 7] = float("nan")
    x.view(-1)[3 :: 11] = float("-inf")
    kernel, stride = list(_pair(kernel)), list(_pair(stride))
    out, idx = torch.ops.pymeta_cpu.max_pool2d(x, kernel, stride)
    ref, ref_idx = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, [0, 0], [1, 1], False)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    strided = x.transpose(2, 3)  # made contiguous by the kernel
    torch.testing.assert_close(torch.ops.pymeta_cpu.max_pool2d(strided, kernel, stride)[1],
                               torch.ops.aten.max_pool2d_with_indices(strided, kernel, stride, [0, 0], [1, 1],
                                                                      False)[1], rtol=0, atol=0)


@needs_cpp
def test_cpp_kernel_bad_arguments():
    op = torch.ops.pymeta_cpu.max_pool2d
    with pytest.raises(ValueError, match=r"input must be \[N, C, H, W\], got shape \[4, 4\]"):
        op(torch.zeros(4, 4), [2, 2], [2, 2])
    with pytest.raises(ValueError, match=r"input plane 3x3 is smaller than the kernel \[4, 4\]"):
        op(torch.zeros(1, 1, 3, 3), [4, 4], [1, 1])
    with pytest.raises(ValueError, match="kernel and stride must be >= 1"):
        op(torch.zeros(1, 1, 3, 3), [2, 2], [0, 1])


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
