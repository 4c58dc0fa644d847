"""pymeta.ops.adaptive_max_pool2d: exactly F.adaptive_max_pool2d (values, gradients, second
derivatives); gradcheck, opcheck and the transforms: tests/test_ops.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_cpp
from test_max_pool2d import with_ties

from pymeta.ops.adaptive_max_pool2d import adaptive_max_pool2d

# Uneven and overlapping windows (7 -> 5, 9 -> 4), the identity, upsampling (every input
# in several windows), a whole plane, None (keep that size); 1 to 131 planes: no, one and
# several blocks of 8 vector lanes, with a scalar remainder.
SIZES = [(5, 5), (5, 4), (7, 9), (9, 11), (1, 1), (3, None), 4]
SHAPES = [(1, 3, 7, 9), (2, 4, 7, 9), (3, 5, 7, 9), (1, 131, 7, 9)]


@pytest.mark.parametrize("output_size", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_equal_f_adaptive_max_pool2d_with_ties(shape, output_size):
    x = with_ties(shape).requires_grad_()
    ours, theirs = adaptive_max_pool2d(x, output_size), F.adaptive_max_pool2d(x, output_size)
    assert torch.equal(ours, theirs)
    probe = torch.randn_like(theirs).requires_grad_()
    grads = [torch.autograd.grad((out * probe).sum(), x, create_graph=True)[0] for out in (ours, theirs)]
    assert torch.equal(grads[0], grads[1])  # same argmax on ties: the first in the window
    weights = torch.randn_like(x)  # second order: a gather of the probe by the argmax
    second = [torch.autograd.grad((g * weights).sum(), probe)[0] for g in grads]
    assert torch.equal(second[0], second[1])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_size", [(5, 5), (5, 4), (9, 11), (1, 1), (2, 3)])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 8, 6, 6), (1, 1, 1, 1), (1, 19, 28, 19)])
def test_cpp_kernel_equals_aten_bit_for_bit(dtype, shape, output_size):
    x = with_ties(shape, dtype) - 1.0  # ties at 0 and -1, negatives too
    x.view(-1)[:: 7] = float("nan")
    x.view(-1)[3 :: 11] = float("-inf")
    out, idx = torch.ops.pymeta_cpu.adaptive_max_pool2d(x, list(output_size))
    ref, ref_idx = torch.ops.aten.adaptive_max_pool2d(x, list(output_size))
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), ref_idx)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    strided = x.transpose(2, 3)  # made contiguous by the kernel
    assert torch.equal(torch.ops.pymeta_cpu.adaptive_max_pool2d(strided, list(output_size))[1].long(),
                       torch.ops.aten.adaptive_max_pool2d(strided, list(output_size))[1])
    # Backward: overlapping windows (9 -> 11 columns) add in ATen's order, bit for bit.
    grad = torch.randn(ref.shape, dtype=dtype)
    assert torch.equal(torch.ops.pymeta_cpu.adaptive_max_pool2d_backward(grad, idx, list(shape[2:])),
                       torch.ops.aten.adaptive_max_pool2d_backward(grad, x, ref_idx))


@needs_cpp
def test_cpp_kernel_bad_arguments():
    op = torch.ops.pymeta_cpu.adaptive_max_pool2d
    with pytest.raises(ValueError, match=r"input must be \[N, C, H, W\], got shape \[4, 4\]"):
        op(torch.zeros(4, 4), [2, 2])
    with pytest.raises(ValueError, match=r"output_size must be 2 values >= 1, got \[0, 2\]"):
        op(torch.zeros(1, 1, 3, 3), [0, 2])
    with pytest.raises(ValueError, match=r"input planes must not be empty, got shape \[1, 1, 0, 3\]"):
        op(torch.zeros(1, 1, 0, 3), [2, 2])
    backward = torch.ops.pymeta_cpu.adaptive_max_pool2d_backward
    grad, idx = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="indices must be int32, got Long"):
        backward(grad, idx.long(), [3, 3])
    with pytest.raises(ValueError, match=r"grad and indices must be \[N, C, OH, OW\] of one shape"):
        backward(grad, idx[0], [3, 3])
    with pytest.raises(IndexError, match="index 9 is outside a plane of 9 elements"):
        backward(grad, idx + 9, [3, 3])


def test_op_rejects_a_bad_output_size():
    with pytest.raises(ValueError, match=r"output_size must be 2 sizes >= 1, got \[0, 5\]"):
        torch.ops.pymeta.adaptive_max_pool2d(torch.zeros(1, 1, 3, 3), [0, 5])


def test_cases_outside_the_fast_path_fall_back_to_f_adaptive_max_pool2d():
    x = with_ties((2, 4, 7, 7))
    out, idx = adaptive_max_pool2d(x, 5, return_indices=True)
    ref_out, ref_idx = F.adaptive_max_pool2d(x, 5, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    assert torch.equal(adaptive_max_pool2d(x[0], 5), F.adaptive_max_pool2d(x[0], 5))  # 3-D input
    assert torch.equal(adaptive_max_pool2d(x.half(), 5), F.adaptive_max_pool2d(x.half(), 5))


def test_gradient_layout_is_nchw_as_f_adaptive_max_pool2d():
    """The backward gets a zero-stride stand-in for the input it did not save; the
    gradient's strides must still be those of F.adaptive_max_pool2d's (NCHW)."""
    x = with_ties((2, 3, 7, 9)).requires_grad_()
    ours, theirs = (torch.autograd.grad(f(x, 5).sum(), x)[0] for f in (adaptive_max_pool2d, F.adaptive_max_pool2d))
    assert ours.stride() == theirs.stride() and torch.equal(ours, theirs)
