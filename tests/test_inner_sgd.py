"""pymeta.ops.inner_sgd: every runnable backend against exact math per dtype and lr form,
tiling, strided inputs, launch count and input errors (gradcheck, opcheck and the
transforms: tests/test_ops.py)."""

import importlib

import pytest
import torch
from conftest import report
from op_cases import LR_FORMS, T, backend_params, lr_tensors, make_lr, torch_update

from pymeta.ops import force_backend, inner_sgd
from pymeta.ops._backends import unavailable_reason

CPU = torch.device("cpu")
SHAPES = [(T, 1601), (T, 40, 1), (T, 7, 5, 3, 3), (T,)]  # odd sizes, a [T] tensor


@pytest.fixture(params=backend_params("reference", "cpp", "triton"))
def backend(request):
    with force_backend(request.param):
        yield request.param


def random_inputs(shapes, dtype, requires_grad=False):
    params = [torch.randn(s, dtype=dtype).requires_grad_(requires_grad) for s in shapes]
    grads = [torch.randn(s, dtype=dtype).requires_grad_(requires_grad) for s in shapes]
    return params, grads


def assert_within_2x_torch(name, got, exact, torch_result):
    """Error vs the float64 result at most 2x PyTorch's own at that precision (+1 ulp).

    For float64 outputs the float64 "exact" result is PyTorch's own, so the bound is a
    few ulps of the largest value instead (sums may round differently).
    """
    report(name, got, exact)
    err = (got.double() - exact).abs().max().item()
    torch_err = (torch_result.double() - exact).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * exact.abs().max().item()
    bound = 16 * ulp if got.dtype == torch.float64 else 2 * torch_err + ulp
    assert got.shape == exact.shape and got.dtype == torch_result.dtype
    assert err <= bound, f"{name}: error {err:.3e} vs PyTorch's {torch_err:.3e}"


@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_exact_math(backend, dtype, form):
    acc = torch.promote_types(dtype, torch.float32)
    params, grads = random_inputs(SHAPES, dtype, requires_grad=True)
    lr = make_lr(form, SHAPES, acc, requires_grad=True)
    rates = lr_tensors(lr)
    inputs = [*params, *grads, *rates]
    outs = inner_sgd(params, grads, lr)
    grad_outs = [torch.randn_like(o) for o in outs]
    # No create_graph: the fused backward op runs.
    got_grads = torch.autograd.grad(outs, inputs, grad_outs)

    exact_in = [x.detach().double().requires_grad_() for x in inputs]
    n = len(params)
    exact_lr = lr if isinstance(lr, float) else exact_in[2 * n] if isinstance(lr, torch.Tensor) else exact_in[2 * n :]
    exact = torch_update(exact_in[:n], exact_in[n : 2 * n], exact_lr)
    exact_grads = torch.autograd.grad(exact, exact_in, [go.double() for go in grad_outs])
    # PyTorch at this precision: rates rounded to the params' dtype, every op rounded.
    plain = torch_update(params, grads, lr, dtype=dtype)
    plain_grads = torch.autograd.grad(plain, inputs, grad_outs)
    for k in range(n):
        assert_within_2x_torch(f"out[{k}]", outs[k], exact[k], plain[k])
    for i, x in enumerate(inputs):
        # The lr gradient keeps the rate's dtype; PyTorch's sums ran in the params' dtype.
        expected_plain = plain_grads[i].to(x.dtype)
        assert_within_2x_torch(f"grad[{i}]", got_grads[i], exact_grads[i], expected_plain)


@pytest.mark.parametrize("form", LR_FORMS)
def test_large_tensors_split_into_tiles(backend, form):
    """Rows longer than a CPU tile (32768 elements) and enough elements to run in parallel."""
    if backend == "triton":
        pytest.skip("C++ tiling check; the interpreter is slow and Triton's tiles are covered above")
    shapes = [(T, 40000), (T, 700, 50)]
    params, grads = random_inputs(shapes, torch.float64, requires_grad=True)
    lr = make_lr(form, shapes, torch.float64, requires_grad=True)
    inputs = [*params, *grads, *lr_tensors(lr)]
    outs = inner_sgd(params, grads, lr)
    grad_outs = [torch.randn_like(o) for o in outs]
    expected = torch_update(params, grads, lr)
    for a, e in zip([*outs, *torch.autograd.grad(outs, inputs, grad_outs)],
                    [*expected, *torch.autograd.grad(expected, inputs, grad_outs)], strict=True):
        report(f"large {form}", a, e)
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_strided_inputs(backend):
    """Expanded params, transposed / sliced grads and rates give the contiguous-input result."""
    base = torch.randn(40, 6, dtype=torch.float64)
    params = [base.unsqueeze(0).expand(T, 40, 6), torch.randn(T, 6, 40, dtype=torch.float64).transpose(1, 2)]
    grads = [torch.randn(T, 80, 6, dtype=torch.float64)[:, ::2], torch.randn(6, T, 40, dtype=torch.float64).permute(1, 2, 0)]
    rates = [torch.rand(6, 40, dtype=torch.float64).t(), torch.rand(T, 40, 12, dtype=torch.float64)[:, :, ::2]]
    for lr in (0.3, torch.rand(2 * T, dtype=torch.float64)[::2], rates):
        got = inner_sgd(params, grads, lr)
        expected = torch_update([p.contiguous() for p in params], [g.contiguous() for g in grads], lr)
        for a, e in zip(got, expected, strict=True):
            report("strided", a, e)
            assert a.is_contiguous()
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)
        go = [torch.randn_like(e) for e in expected]
        inputs = [*params, *grads, *lr_tensors(lr)]
        leaves = [x.detach().requires_grad_() for x in inputs]
        n = len(params)
        rate = lr if isinstance(lr, float) else leaves[2 * n] if isinstance(lr, torch.Tensor) else leaves[2 * n :]
        got = torch.autograd.grad(inner_sgd(leaves[:n], leaves[n : 2 * n], rate), leaves, go)
        expected = torch.autograd.grad(torch_update(leaves[:n], leaves[n : 2 * n], rate), leaves, go)
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)


def test_mixed_dtypes_empty_tensors_and_unused_outputs(backend):
    params = [torch.randn(T, 9), torch.randn(T, 4, dtype=torch.float64), torch.randn(T, 0, 5), torch.randn(T, 7)]
    grads = [torch.randn_like(p) for p in params]
    rates = [torch.rand(p.shape[1:], dtype=torch.promote_types(p.dtype, torch.float32)).requires_grad_() for p in params]
    leaves = [x.clone().requires_grad_() for x in (*params, *grads)]
    outs = inner_sgd(leaves[:4], leaves[4:], rates)
    for a, e in zip(outs, torch_update(params, grads, rates), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e)
    # Only outputs 0 and 2 reach the loss: the others get no gradient contribution.
    got = torch.autograd.grad(outs[0].sum() + outs[2].sum(), [*leaves, *rates], materialize_grads=True)
    expected = torch.autograd.grad(
        sum(o.sum() for o in torch_update(leaves[:4], leaves[4:], rates)[::2]), [*leaves, *rates],
        materialize_grads=True,
    )
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e)
    assert inner_sgd([], [], 0.1) == []


def test_one_launch_per_dtype(monkeypatch):
    """The Triton backend launches one forward kernel per dtype, whatever the list length."""
    if unavailable_reason("triton", CPU) is not None:
        pytest.skip(unavailable_reason("triton", CPU))
    kernels = importlib.import_module("pymeta.kernels.inner_sgd")
    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append((self.kernel.__name__, grid))
            return self.kernel[grid]

    for name in ("inner_sgd_forward_kernel", "inner_sgd_backward_kernel", "inner_sgd_reduce_kernel"):
        monkeypatch.setattr(kernels, name, Counting(getattr(kernels, name)))
    shapes = [(T, 5)] * 6 + [(T, 3, 2)] * 4
    params = [torch.randn(s, dtype=torch.float64 if i % 3 else torch.float32) for i, s in enumerate(shapes)]
    grads = [torch.randn_like(p) for p in params]
    with force_backend("triton"):
        inner_sgd(params, grads, 0.1)
        assert [name for name, _ in launches] == ["inner_sgd_forward_kernel"] * 2
        launches.clear()
        lr = torch.rand(T, dtype=torch.float64, requires_grad=True)
        outs = inner_sgd(params, [g.requires_grad_() for g in grads], lr)
        launches.clear()
        torch.autograd.grad(outs, [lr, *grads], [torch.ones_like(o) for o in outs])
    # Per dtype: one backward launch, and one reduction of the per-task lr gradient.
    assert sorted(name for name, _ in launches) == ["inner_sgd_backward_kernel"] * 2 + ["inner_sgd_reduce_kernel"] * 2


BAD_INPUTS = [
    ("lengths", lambda: ([torch.randn(T, 4)] * 2, [torch.randn(T, 4)], 0.1), ValueError,
     r"params and grads must have the same length, got 2 params and 1 grads"),
    ("shape", lambda: ([torch.randn(T, 4), torch.randn(T, 40, 1)], [torch.randn(T, 4), torch.randn(T, 40)], 0.1),
     ValueError, r"grads\[1\] must have the shape of params\[1\], \(3, 40, 1\), got \(3, 40\)"),
    ("integer params", lambda: ([torch.ones(T, 4, dtype=torch.long)], [torch.randn(T, 4)], 0.1), TypeError,
     r"params\[0\] must be a floating-point tensor, got dtype torch.int64"),
    ("dtype", lambda: ([torch.randn(T, 4)], [torch.randn(T, 4, dtype=torch.float64)], 0.1), TypeError,
     r"grads\[0\] must have the dtype of params\[0\], torch.float32, got torch.float64"),
    ("devices", lambda: ([torch.randn(T, 4), torch.randn(T, 2)], [torch.randn(T, 4), torch.randn(T, 2, device="meta")], 0.1),
     ValueError, r"all tensors must be on one device.*grads\[1\] on meta"),
    ("lr element shape", lambda: ([torch.randn(T, 4)] * 2 + [torch.randn(T, 40, 1)], [torch.randn(T, 4)] * 2 + [torch.randn(T, 40, 1)],
                                  [torch.rand(4), torch.rand(4), torch.rand(3)]),
     ValueError, r"lr\[2\] must have shape \(40, 1\) to match params\[2\] \(without its task dim\).*got \(3,\)"),
    ("lr list length", lambda: ([torch.randn(T, 4)] * 2, [torch.randn(T, 4)] * 2, [torch.rand(4)]), ValueError,
     r"params and lr must have the same length, got 2 params and 1 lr"),
    ("lr tasks", lambda: ([torch.randn(T, 4), torch.randn(T + 1, 4)], [torch.randn(T, 4), torch.randn(T + 1, 4)], torch.rand(T)),
     ValueError, r"lr of shape \(3,\) holds one rate per task, so params\[1\] must have 3 tasks.*got shape \(4, 4\)"),
    ("lr rank", lambda: ([torch.randn(T, 4)], [torch.randn(T, 4)], torch.rand(T, 4)), ValueError,
     r"lr must be a float, a 0-dim tensor, a \[T\] tensor of per-task rates or a list"),
    ("lr integer", lambda: ([torch.randn(T, 4)], [torch.randn(T, 4)], torch.ones(T, dtype=torch.long)), TypeError,
     r"lr must be a floating-point tensor, got dtype torch.int64"),
    ("lr type", lambda: ([torch.randn(T, 4)], [torch.randn(T, 4)], "0.1"), TypeError,
     r"lr must be a float, a tensor or a list of tensors, got str"),
    ("lone tensor", lambda: (torch.randn(T, 4), [torch.randn(T, 4)], 0.1), TypeError,
     r"params must be a list or tuple of tensors, got Tensor"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(backend, case):
    _, make, error, message = case
    params, grads, lr = make()
    with pytest.raises(error, match=message):
        inner_sgd(params, grads, lr)


def test_op_rejects_rates_in_the_wrong_dtype(backend):
    with pytest.raises(TypeError, match=r"lr\[0\] must have dtype torch.float32 .* got torch.float16"):
        torch.ops.pymeta.inner_sgd([torch.randn(T, 4, dtype=torch.bfloat16)], [torch.randn(T, 4, dtype=torch.bfloat16)],
                                   [torch.rand(4, dtype=torch.float16)], 1.0)


def test_small_cpu_calls_run_as_plain_torch_ops_and_agree_with_the_op():
    """Unforced, tiny CPU inputs skip the custom op (its fixed cost exceeds the work);
    results, second derivatives and input errors are the op's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    module = importlib.import_module("pymeta.ops.inner_sgd")

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += str(func).startswith("pymeta.inner_sgd")
            return func(*args, **(kwargs or {}))

    def run(numel_per_task: int, forced: str | None):
        torch.manual_seed(0)
        p = torch.randn(3, numel_per_task, dtype=torch.float64, requires_grad=True)
        g0 = torch.randn(3, numel_per_task, dtype=torch.float64, requires_grad=True)
        lr = torch.full((numel_per_task,), 0.1, dtype=torch.float64, requires_grad=True)
        counter = CountOps()
        with force_backend(forced), counter:
            (out,) = inner_sgd([p], [g0 * p], [lr])
            first = torch.autograd.grad(out.square().sum(), [p, lr], create_graph=True)
            second = torch.autograd.grad(sum(f.sum() for f in first), [p, lr])
        return [out, *first, *second], counter.ops

    small = module.COMPOSITE_MAX_NUMEL // 6
    plain, plain_ops = run(small, None)
    fused, fused_ops = run(small, "cpp")
    assert plain_ops == 0 and fused_ops > 0
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert run(module.COMPOSITE_MAX_NUMEL // 3 + 1, None)[1] > 0  # large: the fused op
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        inner_sgd([torch.randn(3, 4)], [torch.randn(3, 5)], 0.1)
