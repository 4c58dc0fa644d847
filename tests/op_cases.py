"""Every fused op as test cases: float64 inputs, the pymeta call and the same math in plain torch.

tests/test_ops.py runs the checks every op must pass on each case (gradcheck,
gradgradcheck, opcheck, torch.func / vmap / torch.compile); the per-op test files check
what is particular to an op and import its plain-torch math from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pymeta import ops
from pymeta.ops._backends import unavailable_reason
from pymeta.ops.memory_access import composite as memory_access_composite
from pymeta.ops.proto_logits import EPS

T = 3
LR_FORMS = ["float", "scalar", "task", "element", "task_element", "layer"]


def backend_params(*names: str) -> list:
    """pytest params for backends ``names``, each skipped with the reason it cannot run here."""
    params = []
    for name in names:
        reason = unavailable_reason(name, torch.device("cpu"))
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")))
    return params


# ------------------------------------------------------------ plain-torch math
def torch_update(params: list[Tensor], grads: list[Tensor], lr: Any, dtype: torch.dtype | None = None) -> list[Tensor]:
    """``[p - lr * g]`` as a per-tensor PyTorch loop, in ``dtype`` (default: the inputs' own)."""
    def cast(x: Tensor) -> Tensor:
        return x if dtype is None else x.to(dtype)

    outs = []
    for k, (p, g) in enumerate(zip(params, grads, strict=True)):
        if isinstance(lr, float):
            rate = lr
        elif isinstance(lr, Tensor):
            rate = cast(lr).view(-1, *(1,) * (p.dim() - 1)) if lr.dim() else cast(lr)
        else:
            rate = cast(lr[k])
        outs.append(cast(p) - rate * cast(g))
    return outs


def make_lr(form: str, shapes: list, dtype: torch.dtype, requires_grad: bool = False) -> Any:
    """The lr of ``form`` for params of ``shapes``: a float, a tensor or a list of tensors."""
    if form == "float":
        return 0.37
    shape_of = {"scalar": lambda s: (), "task": lambda s: (T,), "element": lambda s: s[1:],
                "task_element": lambda s: s, "layer": lambda s: ()}[form]
    rates = [(torch.rand(shape_of(s), dtype=dtype) + 0.1).requires_grad_(requires_grad) for s in shapes]
    return rates if form in ("element", "task_element", "layer") else rates[0]


def lr_tensors(lr: Any) -> list[Tensor]:
    return [] if isinstance(lr, float) else [lr] if isinstance(lr, Tensor) else list(lr)


def loop_means(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """float64 class means, one task and class at a time (as easyfsl computes them)."""
    s = support.double()
    return torch.stack([
        torch.stack([s[t][labels[t] == c].mean(0) for c in range(n_way)]) for t in range(s.shape[0])
    ])


def exact_logits(query: Tensor, protos: Tensor, metric: str) -> Tensor:
    """float64 logits from explicit differences ``[T, Q, N, D]`` (fine at test sizes)."""
    q, p = query.double(), protos.double()
    if metric == "cosine":
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(EPS)
        p = p / p.norm(dim=-1, keepdim=True).clamp_min(EPS)
        return q @ p.mT
    sq = (q.unsqueeze(2) - p.unsqueeze(1)).pow(2).sum(-1)
    if metric == "sqeuclidean":
        return -sq
    # The op's convention: the gradient of |q - p| at q == p is 0 (sqrt' would give NaN).
    hit = sq == 0
    return -torch.where(hit, 0, torch.where(hit, 1, sq).sqrt())


def relation_loop(classes, queries, weight, bias, running_mean, running_var, eps: float = 1e-5) -> Tensor:
    """Per task: the ``[Q * N, C, H, W]`` pairs built explicitly, ``F.batch_norm`` (that
    task's batch statistics, or the running ones), ReLU -> ``[T, Q, N, C, H, W]``."""
    out = []
    for t in range(classes.shape[0]):
        pairs = (classes[t].unsqueeze(0) + queries[t].unsqueeze(1)).flatten(0, 1)
        rm, rv, w, b = (p if p is None or p.dim() == 1 else p[t] for p in (running_mean, running_var, weight, bias))
        y = F.batch_norm(pairs, rm, rv, w, b, training=running_mean is None, eps=eps)
        out.append(F.relu(y).unflatten(0, (queries.shape[1], classes.shape[1])))
    return torch.stack(out)


# ------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class OpCase:
    """One op on one kind of input.

    ``inputs()``: fresh float64 tensors (the ones differentiated); ``fn(*inputs)``: the
    pymeta call; ``exact(*inputs)``: the same math in plain torch ops. Both return a
    tensor or a list of tensors.
    """

    id: str
    inputs: Callable[[], tuple[Tensor, ...]]
    fn: Callable[..., Any]
    exact: Callable[..., Any]
    backends: tuple[str, ...] = ("reference", "cpp", "triton")


def _inner_sgd_case(form: str) -> OpCase:
    """``form``: an LR_FORMS entry, or "mixed": a list with one rate per element, per task and
    element, per tensor and per task (``[T, 1, 1]``), one kind per param."""
    shapes = [(T, 2), (T, 3, 1), (T,), (T, 2, 2)]  # tiny: the Triton interpreter is slow
    n = len(shapes)

    def rates() -> list[Tensor]:
        if form != "mixed":
            return lr_tensors(make_lr(form, shapes, torch.float64))
        return [torch.rand(s, dtype=torch.float64) + 0.1 for s in ((2,), (T, 3, 1), (), (T, 1, 1))]

    def inputs() -> tuple[Tensor, ...]:
        params = [torch.randn(s, dtype=torch.float64) for s in shapes]
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        return (*params, *grads, *rates())

    def split(update: Callable[..., Any]) -> Callable[..., Any]:
        def call(*xs: Tensor) -> Any:
            rest = xs[2 * n :]
            lr = 0.37 if form == "float" else rest[0] if form in ("scalar", "task") else list(rest)
            return update(list(xs[:n]), list(xs[n : 2 * n]), lr)

        return call

    return OpCase(f"inner_sgd-{form}", inputs, split(ops.inner_sgd), split(torch_update))


def _inner_sgd_expanded_case() -> OpCase:
    """Params given as an expanded view (MAML's first step): the gradient sums over tasks."""

    def inputs() -> tuple[Tensor, ...]:
        return torch.randn(3, 1, dtype=torch.float64), torch.randn(T, 3, 1, dtype=torch.float64)

    def split(update: Callable[..., Any]) -> Callable[..., Any]:
        return lambda base, grad: update([base.expand(T, *base.shape)], [grad], 0.37)

    return OpCase("inner_sgd-expanded", inputs, split(ops.inner_sgd), split(torch_update))


def _prototypes_case() -> OpCase:
    labels = torch.tensor([[0, 1, 2, 0, 2, 1], [2, 2, 1, 0, 0, 1]])
    return OpCase(
        "prototypes", lambda: (torch.randn(2, 6, 4, dtype=torch.float64),),
        lambda s: ops.prototypes(s, labels, 3), lambda s: loop_means(s, labels, 3),
    )


def _proto_logits_case(metric: str) -> OpCase:
    return OpCase(
        f"proto_logits-{metric}",
        lambda: (torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)),
        lambda q, p: ops.proto_logits(q, p, metric), lambda q, p: exact_logits(q, p, metric),
    )


def _max_pool2d_case() -> OpCase:
    # rand: distinct values, no ties (a tie is a kink that finite differences straddle).
    # Planes >= 16 wide: the automatic choice is the C++ kernel. The op itself, not
    # ops.max_pool2d, which leaves pooling to the compiler under torch.compile (its other
    # cases are F.max_pool2d's: tests/test_max_pool2d.py).
    return OpCase(
        "max_pool2d", lambda: (torch.rand(1, 2, 5, 17, dtype=torch.float64),),
        lambda x: torch.ops.pymeta.max_pool2d(x, [3, 2], [2, 2])[0], lambda x: F.max_pool2d(x, (3, 2), (2, 2)),
        backends=("reference", "cpp"),
    )


def _adaptive_max_pool2d_case() -> OpCase:
    # Adaptive windows of uneven sizes (7 -> 5 rows: 2, 2, 3, 2, 2) and overlapping (9 ->
    # 4 columns); 9 planes: one block of 8 vector lanes and a scalar remainder. The op
    # itself (ops.adaptive_max_pool2d leaves pooling to the compiler under torch.compile;
    # its other cases are F.adaptive_max_pool2d's: tests/test_adaptive_max_pool2d.py).
    return OpCase(
        "adaptive_max_pool2d", lambda: (torch.rand(3, 3, 7, 9, dtype=torch.float64),),
        lambda x: torch.ops.pymeta.adaptive_max_pool2d(x, [5, 4])[0], lambda x: F.adaptive_max_pool2d(x, (5, 4)),
        backends=("reference", "cpp"),
    )


def _relation_pairs_case(mode: str) -> OpCase:
    """Train mode (each task's batch statistics) or eval mode (fixed running statistics, not
    differentiated); per-task affine parameters ``[T, C]``; an offset on the class side."""
    T_, N, Q, C, H, W = 2, 3, 2, 2, 2, 3
    running = (None, None) if mode == "train" else (torch.randn(T_, C, dtype=torch.float64) + 3,
                                                     torch.rand(T_, C, dtype=torch.float64) + 0.5)

    def inputs() -> tuple[Tensor, ...]:
        return (torch.randn(T_, N, C, H, W, dtype=torch.float64) + 3, torch.randn(T_, Q, C, H, W, dtype=torch.float64),
                torch.randn(T_, C, dtype=torch.float64), torch.randn(T_, C, dtype=torch.float64))

    return OpCase(
        f"relation_pairs-{mode}", inputs,
        lambda c, q, w, b: ops.relation_pairs(c, q, w, b, *running), lambda c, q, w, b: relation_loop(c, q, w, b, *running),
    )


def _batch_norm_relu_pool_case(mode: str, width: int) -> OpCase:
    """Train mode (batch statistics) or eval mode (running statistics, not differentiated);
    an odd height and width (a row and a column pooled away); weights of both signs, so the
    kernel's window choice runs on maxima and minima of x. Width 7 (3 windows per row) runs
    the C++ kernel's plain loop, 11 (5 windows) its chunks of 4 windows and 19 (9 windows)
    its chunks of 8, a row's last chunk overlapping the one before."""
    C = 3
    running = (None, None) if mode == "train" else (torch.randn(C, dtype=torch.float64),
                                                     torch.rand(C, dtype=torch.float64) + 0.5)

    def inputs() -> tuple[Tensor, ...]:
        return (torch.rand(2, C, 5, width, dtype=torch.float64), torch.tensor([1.5, -0.8, 0.6], dtype=torch.float64),
                torch.randn(C, dtype=torch.float64))

    def three_ops(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.relu(F.max_pool2d(F.batch_norm(x, *running, w, b, training=mode == "train"), 2))

    return OpCase(
        f"batch_norm_relu_pool-{mode}-w{width}", inputs, lambda x, w, b: ops.batch_norm_relu_pool(x, w, b, *running),
        three_ops, backends=("reference", "cpp"),
    )


def _grouped_conv2d_case(stride: int, dilation: int) -> OpCase:
    """3 groups, an odd plane height, a non-square kernel; ``stride`` and ``dilation`` reach
    ATen's convolution_backward and the double-backward convolutions alike."""
    def inputs() -> tuple[Tensor, ...]:
        return (torch.randn(2, 6, 7, 8, dtype=torch.float64), torch.randn(9, 2, 3, 2, dtype=torch.float64),
                torch.randn(9, dtype=torch.float64))

    options = dict(stride=stride, padding=1, dilation=dilation, groups=3)
    return OpCase(
        f"grouped_conv2d-s{stride}-d{dilation}", inputs, lambda x, w, b: ops.grouped_conv2d(x, w, b, **options),
        lambda x, w, b: F.conv2d(x, w, b, **options),
        backends=("reference", "cpp") if stride == dilation == 1 else ("reference",),  # the kernels: stride 1
    )


def _grouped_conv2d_winograd_case(padding: int) -> OpCase:
    """4 input channels per group, past the tap loops: Winograd's F(2x2, 3x3) on CPU.
    Output sizes odd and even (the last tiles half outside the plane); padding 0 and 2,
    where the input gradient's is 2 and 0."""
    def inputs() -> tuple[Tensor, ...]:
        return (torch.randn(2, 8, 5, 6, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64),
                torch.randn(6, dtype=torch.float64))

    options = dict(padding=padding, groups=2)
    return OpCase(
        f"grouped_conv2d-winograd-p{padding}", inputs, lambda x, w, b: ops.grouped_conv2d(x, w, b, **options),
        lambda x, w, b: F.conv2d(x, w, b, **options), backends=("reference", "cpp"),
    )


def _conv2d_batch_norm_relu_pool_case(mode: str) -> OpCase:
    """Two groups of one input channel (the images: not differentiated, as in a model's
    first layer), a 3x2 kernel, a 5 x 9 output with a row and a column pooled away; the
    conv weights, conv bias and BatchNorm's weight and bias are the inputs."""
    C = 4
    x = torch.rand(2, 2, 5, 8, dtype=torch.float64)
    running = (None, None) if mode == "train" else (torch.randn(C, dtype=torch.float64),
                                                     torch.rand(C, dtype=torch.float64) + 0.5)
    options = dict(padding=(1, 1), groups=2)

    def inputs() -> tuple[Tensor, ...]:
        return (torch.randn(C, 1, 3, 2, dtype=torch.float64), torch.randn(C, dtype=torch.float64),
                torch.tensor([1.5, -0.8, 0.6, 1.1], dtype=torch.float64), torch.randn(C, dtype=torch.float64))

    def plain(cw: Tensor, cb: Tensor, w: Tensor, b: Tensor) -> Tensor:
        y = F.conv2d(x, cw, cb, **options)
        return F.relu(F.max_pool2d(F.batch_norm(y, *running, w, b, training=mode == "train"), 2))

    return OpCase(
        f"conv2d_batch_norm_relu_pool-{mode}", inputs,
        lambda cw, cb, w, b: ops.conv2d_batch_norm_relu_pool(x, cw, cb, w, b, *running, **options),
        plain, backends=("reference", "cpp"),
    )


def _memory_access_case() -> OpCase:
    """One MANN step, T=2 tasks, R=5 rows of width 3, H=2 heads; usages distinct and well
    apart, so finite differences never change which rows are least used."""
    T_, R, W, H = 2, 5, 3, 2

    def inputs() -> tuple[Tensor, ...]:
        usage = torch.stack([torch.randperm(R) for _ in range(T_)]).double() * 0.125
        return (torch.randn(T_, R, W, dtype=torch.float64), usage,
                torch.softmax(torch.randn(T_, H, R, dtype=torch.float64), -1),
                torch.randn(T_, H, W, dtype=torch.float64), torch.randn(T_, H, W, dtype=torch.float64),
                torch.rand(T_, H, dtype=torch.float64))

    return OpCase(
        "memory_access", inputs, lambda *xs: list(ops.memory_access(*xs, gamma=0.9)),
        lambda *xs: list(memory_access_composite(*xs, gamma=0.9)),
    )


# inner_sgd's rate forms reach the kernels as a float (no rate tensors), as views of one
# tensor (scalar, task) or as a list, whose per-param kinds "mixed" covers in one call.
CASES = [
    *(_inner_sgd_case(form) for form in ("float", "scalar", "task", "mixed")), _inner_sgd_expanded_case(),
    _prototypes_case(), *(_proto_logits_case(m) for m in ("sqeuclidean", "euclidean", "cosine")), _max_pool2d_case(), _adaptive_max_pool2d_case(),
    *(_relation_pairs_case(mode) for mode in ("train", "eval")), _memory_access_case(),
    *(_batch_norm_relu_pool_case(mode, width) for mode in ("train", "eval") for width in (7, 11, 19)),
    _grouped_conv2d_case(1, 1), _grouped_conv2d_case(2, 2), _grouped_conv2d_winograd_case(0),
    _grouped_conv2d_winograd_case(2),
    *(_conv2d_batch_norm_relu_pool_case(mode) for mode in ("train", "eval")),
]
