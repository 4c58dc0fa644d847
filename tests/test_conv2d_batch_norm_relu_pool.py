"""pymeta.ops.conv2d_batch_norm_relu_pool: the C++ kernels against plain torch (F.conv2d,
F.batch_norm, F.max_pool2d, F.relu) in float64; the second-order path; images that need a
gradient; argument errors; gradcheck, opcheck and the transforms: tests/test_ops.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_cpp

import pymeta
from pymeta.ops import conv2d_batch_norm_relu_pool

# (B, groups, Ci, Co, H, W, kernel, padding): conv4's first layer, colour images, outputs
# with an odd row or column (pooled away), several tap blocks (3 x 3x3 = 27, 5x5 = 25),
# an output of 2x2 (one window), groups.
SHAPES = [
    (6, 1, 1, 8, 28, 28, (3, 3), (1, 1)),
    (3, 2, 3, 4, 9, 11, (3, 3), (1, 1)),
    (2, 1, 2, 3, 7, 7, (5, 5), (2, 2)),
    (4, 3, 1, 2, 6, 9, (2, 2), (0, 0)),
    (3, 1, 1, 5, 2, 2, (3, 3), (1, 1)),
]


def _arguments(shape, mode, dtype=torch.float64):
    B, G, Ci, Co, H, W, kernel, padding = shape
    C = G * Co
    x = torch.randn(B, G * Ci, H, W, dtype=dtype)
    params = [torch.randn(C, Ci, *kernel, dtype=dtype), torch.randn(C, dtype=dtype),
              torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)]  # weights of both signs
    running = (None, None) if mode == "train" else (torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5)
    return x, [p.requires_grad_() for p in params], running, dict(padding=padding, groups=G)


def _plain(x, params, running, options, mode):
    cw, cb, w, b = params
    y = F.conv2d(x, cw, cb, **options)
    return F.relu(F.max_pool2d(F.batch_norm(y, *running, w, b, training=mode == "train"), 2))


@needs_cpp
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_equal_plain_torch_in_float64(shape, mode):
    x, params, running, options = _arguments(shape, mode)
    pymeta.ops.reset_usage()
    ours = conv2d_batch_norm_relu_pool(x, *params, *running, **options)
    theirs = _plain(x, params, running, options, mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, params, probe), torch.autograd.grad(theirs, params, probe), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    used = {(op, backend) for op, backend, _, _ in pymeta.ops.usage()}
    assert {("conv2d_batch_norm_relu_pool", "cpp"), ("conv2d_batch_norm_relu_pool_backward", "cpp")} <= used, used


@needs_cpp
def test_float32_stays_within_rounding_of_float64():
    x, params, running, options = _arguments(SHAPES[0], "train", torch.float32)
    x = x * 4 + 30  # images far from zero: the convolution's mean is large against its spread
    ours = conv2d_batch_norm_relu_pool(x, *params, *running, **options)
    exact = _plain(x.double(), [p.double() for p in params], running, options, "train")
    assert ((ours.double() - exact).abs().max() / exact.abs().max()).item() < 2e-5
    probe = torch.randn_like(exact)
    grads = torch.autograd.grad(ours, params, probe.float())
    exact_grads = torch.autograd.grad(exact, params, probe)
    # Against the largest gradient: the conv bias's is 0 in train mode (BatchNorm removes
    # a per-channel shift), so its float32 value is rounding of terms of that scale.
    scale = max(g.abs().max().item() for g in exact_grads)
    for a, b in zip(grads, exact_grads, strict=True):
        assert (a.double() - b).abs().max().item() < 1e-4 * scale


@needs_cpp
def test_second_order_runs_the_two_ops_and_equals_plain_torch():
    """A graph of the backward (create_graph, as MAML's support set) goes through the two
    ops' differentiable backward ops; second derivatives equal plain torch's."""
    x, params, running, options = _arguments(SHAPES[1], "train")
    derivatives = []
    for fn in (lambda: conv2d_batch_norm_relu_pool(x, *params, *running, **options),
               lambda: _plain(x, params, running, options, "train")):
        out = fn()
        grads = torch.autograd.grad(out.square().sum(), params, create_graph=True)
        derivatives.append(torch.autograd.grad(sum((g * g.detach().sign()).sum() for g in grads), params))
    for a, b in zip(*derivatives, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_images_that_need_a_gradient_get_it():
    """Through the public function (the two ops) and the op called directly (its vjp)."""
    x, params, running, options = _arguments(SHAPES[3], "train")
    x.requires_grad_()
    theirs = _plain(x, params, running, options, "train")
    probe = torch.randn_like(theirs)
    expected = torch.autograd.grad(theirs, [x, *params], probe)
    direct = torch.ops.pymeta.conv2d_batch_norm_relu_pool(
        x, *params, *running, 1e-5, list(options["padding"]), options["groups"])
    for ours in (conv2d_batch_norm_relu_pool(x, *params, *running, **options), direct):
        for a, b in zip(torch.autograd.grad(ours, [x, *params], probe), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bad_arguments_are_clear_errors():
    x, w = torch.zeros(2, 3, 8, 8), torch.zeros(3, 1, 3, 3)  # 3 groups of 1 input and 1 output channel
    with pytest.raises(ValueError, match=r"do not match with groups=1: got shapes \(2, 3, 8, 8\) and \(3, 1, 3, 3\)"):
        conv2d_batch_norm_relu_pool(x, w)
    with pytest.raises(ValueError, match="padding must be an int or a pair of ints >= 0"):
        conv2d_batch_norm_relu_pool(x, w, groups=3, padding=-1)
    with pytest.raises(ValueError, match="is smaller than 2x2"):
        conv2d_batch_norm_relu_pool(torch.zeros(2, 3, 2, 2), w, groups=3)
    with pytest.raises(ValueError, match=r"weight must be \[C\] = \[3\] \(the normalised channels\), got shape \(2,\)"):
        conv2d_batch_norm_relu_pool(x, w, weight=torch.ones(2), groups=3, padding=1)
    with pytest.raises(ValueError, match=r"conv_weight must have 4 dims \[groups \* Co, Ci, kh, kw\], got shape \(4, 3\)"):
        conv2d_batch_norm_relu_pool(x, torch.zeros(4, 3))
