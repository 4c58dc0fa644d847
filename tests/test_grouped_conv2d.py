"""pymeta.ops.grouped_conv2d's C++ kernels (tap loops: forward and weight gradient of
stride-1 convolutions with few input channels per group; Winograd: forward, input and
weight gradient of 3x3 ones with more) against ATen's convolution in float64;
gradcheck, gradgradcheck, opcheck and the transforms on both backends: tests/test_ops.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_cpp

import pymeta
from pymeta.ops.grouped_conv2d import (
    MAX_KERNEL_INPUT_CHANNELS,
    WINOGRAD_MIN_CHANNELS,
    WINOGRAD_MIN_OUTPUT,
    grouped_conv2d,
)

# (B, groups, Ci, Co, H, W, kernel, padding): conv4's first layer (1 -> 64 at 28 x 28),
# colour images, widths that leave a remainder after whole vectors (7, 13, 19), taps in
# one block of the kernel's 9 registers (1x1, 3x2, 3x3) and in several (3 x 3x3 = 27,
# 5x5 = 25), padding 0 to larger than the kernel's reach, one image, several groups.
SHAPES = [
    (6, 1, 1, 64, 28, 28, (3, 3), (1, 1)),
    (2, 1, 3, 5, 19, 13, (3, 3), (1, 1)),
    (3, 3, 2, 4, 7, 8, (3, 2), (1, 0)),
    (1, 2, 1, 3, 9, 7, (5, 5), (2, 2)),
    (2, 1, 3, 2, 6, 6, (1, 1), (0, 0)),
    (2, 2, 1, 3, 5, 5, (3, 3), (3, 2)),
]
# Winograd's: odd and even output sizes (the last tiles half outside the plane), padding
# 0 to 2 (the input gradient's: 2 to 0), one per side, groups, a 3-wide output (one
# tile, half used), more images than a chunk (75 planes of 7 x 7 tiles), planes wider
# than a vector of tiles (19 tiles) with more tiles than a chunk holds, more groups of 16
# channels than a chunk holds (4 of 5).
WINOGRAD_SHAPES = [
    (3, 1, 5, 7, 9, 8, (3, 3), (1, 1)),
    (2, 2, 4, 6, 7, 7, (3, 3), (0, 0)),
    (1, 1, 8, 4, 5, 6, (3, 3), (2, 2)),
    (4, 3, 5, 5, 3, 3, (3, 3), (1, 0)),
    (75, 1, 4, 3, 14, 14, (3, 3), (1, 1)),
    (2, 1, 4, 3, 40, 37, (3, 3), (1, 1)),
    (7, 5, 16, 16, 12, 11, (3, 3), (1, 1)),
]


def _arguments(shape, dtype):
    B, G, Ci, Co, H, W, kernel, padding = shape
    x = torch.randn(B, G * Ci, H, W, dtype=dtype)
    weight = torch.randn(G * Co, Ci, *kernel, dtype=dtype)
    return x, weight, torch.randn(G * Co, dtype=dtype), list(padding), G


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES + WINOGRAD_SHAPES, ids=str)
def test_cpp_kernels_equal_aten_in_float64(shape, dtype):
    x, weight, bias, padding, groups = _arguments(shape, dtype)
    options = ([1, 1], padding, [1, 1], groups)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=padding, groups=groups)
    # float32: inputs exact in both dtypes, so the error is the kernels' float32 sums (over
    # up to one plane), measured against the largest value (cancellation leaves some small).
    def close(actual, expected):
        rtol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())

    for b in (bias, None):
        out = torch.ops.pymeta_cpu.grouped_conv2d(x, weight, b, *options)
        assert out.dtype == dtype
        expected = reference if b is not None else reference - bias.double().view(-1, 1, 1)
        close(out, expected)
    grad = torch.randn(reference.shape, dtype=dtype)
    gw = torch.ops.pymeta_cpu.grouped_conv2d_weight_grad(grad, x, weight, *options)
    expected = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight.double(), None, [1, 1], padding, [1, 1], False, [0, 0], groups,
        [False, True, False],
    )[1]
    assert gw.dtype == dtype and gw.shape == weight.shape
    close(gw, expected)
    if all(pad < size for pad, size in zip(padding, weight.shape[2:], strict=True)):
        gx = torch.ops.pymeta_cpu.grouped_conv2d_input_grad(grad, x, weight, *options)
        expected = torch.ops.aten.convolution_backward(
            grad.double(), x.double(), weight.double(), None, [1, 1], padding, [1, 1], False, [0, 0], groups,
            [True, False, False],
        )[0]
        assert gx.dtype == dtype and gx.shape == x.shape
        close(gx, expected)


@needs_cpp
def test_cpp_kernels_take_strided_inputs():
    x, weight, bias, padding, groups = _arguments(SHAPES[1], torch.float64)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    out = torch.ops.pymeta_cpu.grouped_conv2d(x_t, weight, bias, [1, 1], padding, [1, 1], groups)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=padding, groups=groups), rtol=1e-12, atol=1e-12)


@needs_cpp
def test_winograd_takes_an_empty_batch():
    x, weight = torch.randn(0, 16, 12, 12, requires_grad=True), torch.randn(16, 16, 3, 3, requires_grad=True)
    with pymeta.ops.force_backend("cpp"):
        out = grouped_conv2d(x, weight, padding=1)
        gx, gw = torch.autograd.grad(out.sum(), [x, weight])
    assert out.shape == gx.shape == (0, 16, 12, 12) and torch.equal(gw, torch.zeros_like(weight))


@needs_cpp
def test_cpp_kernel_bad_arguments():
    x, weight = torch.zeros(2, 3, 8, 8), torch.zeros(4, 3, 3, 3)
    forward, weight_grad = torch.ops.pymeta_cpu.grouped_conv2d, torch.ops.pymeta_cpu.grouped_conv2d_weight_grad
    with pytest.raises(ValueError, match=r"stride-1, dilation-1 convolutions, got stride \[2, 2\]"):
        forward(x, weight, None, [2, 2], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"x must be \[B, groups \* Ci, H, W\] .* groups = 2, got x \[2, 3, 8, 8\]"):
        forward(x, weight, None, [1, 1], [1, 1], [1, 1], 2)
    with pytest.raises(ValueError, match=r"bias must be \[G\*Co\] = \[4\], got \[3\]"):
        forward(x, weight, torch.zeros(3), [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"kernel \[3, 3\] is larger than x \[2, 3, 2, 2\] padded by \[0, 0\]"):
        forward(torch.zeros(2, 3, 2, 2), weight, None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match=r"grad must be .* = \[2, 4, 8, 8\], got \[2, 4, 6, 6\]"):
        weight_grad(torch.zeros(2, 4, 6, 6), x, weight, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(TypeError, match="grad and x must have one dtype"):
        weight_grad(torch.zeros(2, 4, 8, 8, dtype=torch.float64), x, weight, [1, 1], [1, 1], [1, 1], 1)
    input_grad = torch.ops.pymeta_cpu.grouped_conv2d_input_grad
    with pytest.raises(ValueError, match=r"padding below the kernel size, got kernel \[3, 3\] and padding \[3, 1\]"):
        input_grad(torch.zeros(2, 4, 12, 8), x, weight, [1, 1], [3, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"grad must be .* = \[2, 4, 8, 8\], got \[2, 4, 8, 7\]"):
        input_grad(torch.zeros(2, 4, 8, 7), x, weight, [1, 1], [1, 1], [1, 1], 1)


@needs_cpp
def test_the_kernels_run_where_they_are_faster_and_say_why_not_elsewhere():
    def backends(x, weight, **options):
        pymeta.ops.reset_usage()
        out = grouped_conv2d(x.requires_grad_(), weight.requires_grad_(), **options)
        torch.autograd.grad(out.square().sum(), [x, weight])
        return {op: (backend, why) for op, backend, why, _ in pymeta.ops.usage()}

    few = backends(torch.randn(2, 2 * MAX_KERNEL_INPUT_CHANNELS, 6, 6), torch.randn(4, MAX_KERNEL_INPUT_CHANNELS, 3, 3),
                   padding=1, groups=2)
    assert few["grouped_conv2d"][0] == few["grouped_conv2d_weight_grad"][0] == "cpp"
    assert few["grouped_conv2d_input_grad"][0] == "cpp"  # the forward's tap loops, on 2 "input" channels
    side = WINOGRAD_MIN_OUTPUT
    many = backends(torch.randn(2, WINOGRAD_MIN_CHANNELS, side, side + 1),
                    torch.randn(WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_CHANNELS, 3, 3), padding=1)
    assert {backend for backend, _ in many.values()} == {"cpp"}
    between = backends(torch.randn(2, 8, side, side), torch.randn(WINOGRAD_MIN_CHANNELS, 8, 3, 3), padding=1)
    assert between["grouped_conv2d"] == ("reference", "cpp: 8 input channels per group: oneDNN's kernels are faster "
                                                      f"from 4 to {WINOGRAD_MIN_CHANNELS - 1}")
    assert between["grouped_conv2d_input_grad"][0] == "cpp"  # Winograd on the 16 output channels
    small = backends(torch.randn(2, 16, side - 1, 20), torch.randn(4, 16, 3, 3), padding=1)
    assert small["grouped_conv2d"] == ("reference", f"cpp: {side - 1}x20 outputs: oneDNN's kernels are as fast or faster "
                                                    f"below {side} a side")
    wide = backends(torch.randn(2, 16, 20, 20), torch.randn(16, 16, 5, 5), padding=2)
    assert wide["grouped_conv2d"] == ("reference", "cpp: 5x5 filters, padding [2, 2]: above 3 input channels oneDNN's "
                                                   "kernels are faster, but for 3x3 filters with padding <= 2 (Winograd)")
    assert wide["grouped_conv2d_input_grad"] == wide["grouped_conv2d"]
    padded = backends(torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3), padding=3)
    assert padded["grouped_conv2d_input_grad"][1] == "cpp: the cpp input gradient takes padding below the kernel size, not [3, 3]"
    strided = backends(torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3), stride=2)
    assert "stride-1, dilation-1 convolutions, not stride [2, 2]" in strided["grouped_conv2d_weight_grad"][1]
    with pymeta.ops.force_backend("cpp"), pytest.raises(RuntimeError, match=r"cpp' was forced .* not stride \[2, 2\]"):
        grouped_conv2d(torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3), stride=2)
