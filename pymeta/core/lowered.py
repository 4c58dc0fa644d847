"""The ``"lowered"`` strategy: a model's layers rewritten as natively batched kernels.

``vmap`` pays a fixed Python and dispatch cost per call and per batched op; for small
models (the sinusoid MLP: a few ``[10, 40]`` matmuls per task) that cost, not the
arithmetic, is the meta-step. A model built only from layers listed here (any nesting
of ``nn.Sequential``) is lowered once to a function on ``[T, B, ...]`` inputs and
``[T, *shape]`` fast weights that calls one batched kernel per layer directly:

=========================================  ==============================================
layer                                      batched form (x: ``[T, B, ...]``)
=========================================  ==============================================
``nn.Linear``                              ``baddbmm`` with ``[T, out, in]`` weights
``nn.Conv2d`` (zeros padding)              one grouped convolution, tasks as groups
``nn.BatchNorm1d`` / ``nn.BatchNorm2d``    tasks folded into channels; per-task batch
                                           statistics in train mode, running statistics
                                           in eval mode (:mod:`pymeta.core.norms`)
``nn.LayerNorm``                           normalise, then per-task affine
pooling, ``nn.Flatten``, ``nn.Dropout``    tasks folded into the batch dim (max-pool via
                                           :func:`pymeta.ops.max_pool2d` and
                                           :func:`pymeta.ops.adaptive_max_pool2d`)
elementwise activations                    unchanged (shape-agnostic)
``BatchNorm2d, MaxPool2d(2), ReLU`` (either  one fused kernel on CPU planes at least
order of the last two: conv4's block tail)  :data:`FUSED_MIN_WIDTH` wide (compiled: any)
                                           (:func:`pymeta.ops.batch_norm_relu_pool`)
=========================================  ==============================================

A weight absent from the fast weights (not adapted) is shared by all tasks and used
unbatched; BatchNorm running statistics given with the fast weights (``[T, C]``) replace
the layer's own, and with a ``record`` dict a BatchNorm layer given them puts the batch
statistics it normalised with there (:mod:`pymeta.core.norms`). Anything else (a module with its own ``forward``, e.g. a residual block)
makes :func:`lower` raise :class:`NotLowerable`, and ``strategy="auto"`` then uses
``vmap`` instead. Results equal the per-task model's up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from pymeta import ops
from pymeta.core.norms import Stats, batch_statistics
from pymeta.ops.adaptive_max_pool2d import adaptive_max_pool2d
from pymeta.ops.grouped_conv2d import (
    MAX_KERNEL_INPUT_CHANNELS,
    WINOGRAD_MIN_CHANNELS,
    grouped_conv2d,
    winograd_filters,
)
from pymeta.ops.max_pool2d import max_pool2d

# Narrower planes keep ATen's three kernels (1 thread, [75, 64, W, W], forward + backward,
# benchmarks/bench_batch_norm_relu_pool.py: 28 wide 2.5x faster fused, 14 wide 2.4x,
# 7 wide 0.7x: under 4 windows per row the kernel's rows are too short for its vectors).
FUSED_MIN_WIDTH = 8

# (weights: fast weights {name: [T, *shape]}, x: [T, B, ...], record) -> [T, B, ...];
# record: None, or where BatchNorm layers put their batch statistics.
Layer = Callable[[dict[str, Tensor], Tensor, Stats | None], Tensor]

# Modules that act on each element (or each example) alone, so the task dim is just
# another leading dim. Dropout draws independent masks per element, hence per task.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Identity, nn.Dropout,
)
# Modules that take one [B, C, ...] batch and treat examples independently.
PER_EXAMPLE = (
    nn.MaxPool1d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
)


class NotLowerable(ValueError):
    """The model holds a module the ``"lowered"`` strategy does not know."""


def lower(module: nn.Module) -> Layer:
    """The batched forward of ``module``: ``fn(weights, x [T, B, ...], record) -> [T, B, ...]``.

    Raises:
        NotLowerable: naming the first unsupported submodule and its type.
    """
    return _lower(module, "")


def _lower(module: nn.Module, prefix: str) -> Layer:
    if isinstance(module, nn.Sequential):
        layers = _lower_children(_pool_before_relu(list(module.named_children())), prefix)

        def sequential(weights: dict[str, Tensor], x: Tensor, record: Stats | None) -> Tensor:
            for layer in layers:
                x = layer(weights, x, record)
            return x

        return sequential
    if isinstance(module, ELEMENTWISE):
        return lambda weights, x, record: module(x)
    if isinstance(module, PER_EXAMPLE):
        return lambda weights, x, record: module(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    if isinstance(module, nn.Flatten):
        # Shift the flattened dims past the task dim; negative dims count from the end.
        start = module.start_dim + 1 if module.start_dim >= 0 else module.start_dim
        end = module.end_dim + 1 if module.end_dim >= 0 else module.end_dim
        return lambda weights, x, record: x.flatten(start, end)
    for kind, lowering in LOWERINGS.items():
        if type(module) is kind:
            return lowering(module, prefix)
    name = repr(prefix[:-1]) if prefix else "the model"
    raise NotLowerable(
        f"strategy='lowered' cannot run {name} ({type(module).__name__}): it supports nn.Sequential "
        "trees of Linear, Conv2d, BatchNorm1d/2d, LayerNorm, pooling, Flatten, Dropout and elementwise "
        "activations; use strategy='vmap' or 'auto'"
    )


def _lower_children(children: list[tuple[str, nn.Module]], prefix: str) -> list[Layer]:
    """Each child lowered, a ``BatchNorm2d, MaxPool2d(2), ReLU`` run as one fused layer,
    with the ``Conv2d`` before it when that is a first layer (:func:`_is_first_conv`)."""
    layers, i = [], 0
    while i < len(children):
        name, child = children[i]
        if _is_first_conv(child) and _is_norm_pool_relu([module for _, module in children[i + 1 : i + 4]]):
            tail_name = children[i + 1][0]
            tail = [module for _, module in children[i + 1 : i + 4]]
            layers.append(_conv_batch_norm_relu_pool(child, f"{prefix}{name}.", tail, f"{prefix}{tail_name}."))
            i += 4
        elif _is_norm_pool_relu([module for _, module in children[i : i + 3]]):
            layers.append(_batch_norm_relu_pool(*(module for _, module in children[i : i + 3]), f"{prefix}{name}."))
            i += 3
        else:
            layers.append(_lower(child, f"{prefix}{name}."))
            i += 1
    return layers


def _is_norm_pool_relu(modules: list[nn.Module]) -> bool:
    """``BatchNorm2d, MaxPool2d(2), ReLU`` (a conv4 block's tail after :func:`_pool_before_relu`)."""
    if len(modules) != 3 or [type(m) for m in modules] != [nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]:
        return False
    pool = modules[1]
    return (
        _pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2) and _pair(pool.padding) == (0, 0)
        and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices
    )  # fmt: skip


def _pool_before_relu(children: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``ReLU, MaxPool2d`` reordered to ``MaxPool2d, ReLU``: ReLU then runs on the pooled,
    4x smaller tensor (conv4 on CPU: ~10% of a MAML step).

    Exact, values and derivatives of every order: ReLU is monotonic, so the maximum of
    the rectified window is the rectified maximum; where that maximum is <= 0 both
    orders give 0 with zero gradient, and elsewhere both pick the same (first) argmax,
    since ReLU only merges values that are <= 0. NaN propagates through both.
    """
    out = list(children)
    for i in range(len(out) - 1):
        (_, first), (_, second) = out[i], out[i + 1]
        if type(first) is nn.ReLU and type(second) is nn.MaxPool2d and not second.return_indices:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _getter(module: nn.Module, prefix: str) -> Callable[[dict[str, Tensor], str], Tensor | None]:
    """Reads a parameter or buffer: the task-batched one in ``weights`` if given, else the module's own."""

    def get(weights: dict[str, Tensor], name: str) -> Tensor | None:
        return weights.get(prefix + name, getattr(module, name))

    return get


def _per_task(value: Tensor | None, shared_dims: int, num_tasks: int) -> Tensor | None:
    """``value`` with a leading task dim: fast weights have one, shared ones are expanded."""
    if value is None or value.dim() > shared_dims:
        return value
    return value.unsqueeze(0).expand(num_tasks, *value.shape)


def _linear(module: nn.Linear, prefix: str) -> Layer:
    get = _getter(module, prefix)

    def linear(weights: dict[str, Tensor], x: Tensor, record: Stats | None) -> Tensor:
        weight, bias = get(weights, "weight"), get(weights, "bias")
        if weight.dim() == 2:  # shared weight: one plain matmul over all tasks
            out = F.linear(x, weight)
            return out if bias is None else out + _bias_view(bias, out)
        if torch.compiler.is_compiling() and 1 in weight.shape[1:]:
            return _thin_linear(x, weight, bias)
        # x: [T, B, ..., in] @ [T, in, out], the bias folded into the same kernel. Every
        # view op here is dispatched again in backward: skip the reshapes when x is 3-D.
        rows = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        if bias is None:
            out = torch.bmm(rows, weight.transpose(1, 2))
        else:
            bias = _per_task(bias, 1, x.shape[0])
            out = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
        return out if x.dim() == 3 else out.view(*x.shape[:-1], weight.shape[1])

    return linear


def _thin_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A per-task linear layer with one input or one output feature, written as a
    broadcast product (and a sum): ``x: [T, B, ..., in]``, ``weight: [T, out, in]``.

    A matrix product with a dimension of 1 is an outer product or a dot product; as
    such, a compiler fuses it (forward and backward) with the elementwise neighbours,
    where a batched-matmul call would stay a separate kernel. Used when traced only:
    eagerly ``baddbmm`` is one op, this is two.
    """
    view = (x.shape[0], *([1] * (x.dim() - 2)), *weight.shape[1:])  # [T, 1.., out, in]
    out = (x.unsqueeze(-2) * weight.view(view)).sum(-1)  # [T, B, .., out]
    return out if bias is None else out + _bias_view(_per_task(bias, 1, x.shape[0]), out)


def _bias_view(bias: Tensor, out: Tensor) -> Tensor:
    """A ``[out]`` or ``[T, out]`` bias shaped to add to ``out: [T, B, ..., out]``."""
    if bias.dim() == 1:
        return bias
    return bias.view(bias.shape[0], *([1] * (out.dim() - 2)), bias.shape[1])


def _fold_tasks(x: Tensor) -> Tensor:
    """``[T, B, C, ...]`` -> ``[B, T*C, ...]``: each task's channels side by side, so a
    grouped conv or a BatchNorm over channels treats the tasks separately."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _unfold_tasks(out: Tensor, num_tasks: int) -> Tensor:
    """The inverse of :func:`_fold_tasks` for a result ``[B, T*C', ...]`` -> ``[T, B, C', ...]`` (a view)."""
    return out.view(out.shape[0], num_tasks, -1, *out.shape[2:]).transpose(0, 1)


def _conv2d(module: nn.Conv2d, prefix: str) -> Layer:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise NotLowerable(
            f"strategy='lowered' cannot run {prefix[:-1]!r}: Conv2d with padding "
            f"{module.padding!r} / padding_mode {module.padding_mode!r} (only numeric zero padding)"
        )
    get = _getter(module, prefix)
    options = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    cpu_kernels = _has_cpu_kernels(module)

    def conv2d(weights: dict[str, Tensor], x: Tensor, record: Stats | None) -> Tensor:
        weight, bias = get(weights, "weight"), get(weights, "bias")
        num_tasks, batch = x.shape[:2]
        if weight.dim() == 4 and (bias is None or bias.dim() == 1):  # all shared
            conv = grouped_conv2d if module.groups > 1 or cpu_kernels else F.conv2d
            out = conv(x.flatten(0, 1), weight, bias, groups=module.groups, **options)
            return out.unflatten(0, (num_tasks, batch))
        weight = _per_task(weight, 4, num_tasks)
        bias = _per_task(bias, 1, num_tasks)
        # Tasks become groups: [B, T*C, H, W] * [T*O, C/g, k, k] -> [B, T*O, H', W'],
        # differentiated twice without ATen's per-group loop (pymeta.ops.grouped_conv2d;
        # one group has no loop to avoid, and skips the op's dispatch unless the op has
        # CPU kernels for the layer).
        conv = grouped_conv2d if num_tasks * module.groups > 1 or cpu_kernels else F.conv2d
        out = conv(
            _fold_tasks(x), weight.flatten(0, 1), None if bias is None else bias.flatten(),
            groups=num_tasks * module.groups, **options,
        )
        return _unfold_tasks(out, num_tasks)

    return conv2d


def _has_cpu_kernels(conv: nn.Conv2d) -> bool:
    """Whether :func:`pymeta.ops.grouped_conv2d` has C++ kernels for the layer: tap loops
    for a first layer's few input channels, Winograd for 3x3 filters (which of them runs,
    or neither, the op decides per call, from the input's size)."""
    if conv.stride != (1, 1) or conv.dilation != (1, 1):
        return False
    many_inputs = conv.in_channels // conv.groups >= WINOGRAD_MIN_CHANNELS
    return _few_inputs(conv) or (many_inputs and winograd_filters(conv.kernel_size, conv.padding))


def _few_inputs(conv: nn.Conv2d) -> bool:
    """An image model's first layer (grey or colour images): C++ kernels on CPU
    (:data:`pymeta.ops.grouped_conv2d.MAX_KERNEL_INPUT_CHANNELS`)."""
    return conv.in_channels // conv.groups <= MAX_KERNEL_INPUT_CHANNELS


def _fusable(x: Tensor, width: int) -> bool:
    """Whether a fused CPU block op runs on ``x`` whose planes are ``width`` wide:
    float32 / float64 on CPU, eagerly at least :data:`FUSED_MIN_WIDTH` wide, compiled at any width."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and (width >= FUSED_MIN_WIDTH or torch.compiler.is_compiling())
    )  # fmt: skip


def _norm_arguments(
    module: nn.modules.batchnorm._BatchNorm, prefix: str, weights: dict[str, Tensor], x: Tensor, record: Stats | None
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(folded x [B, T*C, ...], weight, bias, running mean, running var)``, each ``[T*C]`` or None,
    for one kernel that normalises every task with its own affine weights and statistics."""
    folded = _fold_tasks(x)
    weight, bias, mean, var = _norm_parameters(module, prefix, weights, x.shape[0])
    if mean is None and record is not None and prefix + "running_mean" in weights:
        record[prefix[:-1]] = tuple(s.view(x.shape[0], -1) for s in batch_statistics(folded))
    return folded, weight, bias, mean, var


def _norm_parameters(
    module: nn.modules.batchnorm._BatchNorm, prefix: str, weights: dict[str, Tensor], num_tasks: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(weight, bias, running mean, running var)`` of ``num_tasks`` tasks, each ``[T*C]`` or None."""
    get = _getter(module, prefix)
    weight, bias = (
        None if p is None else _per_task(p, 1, num_tasks).flatten() for p in (get(weights, "weight"), get(weights, "bias"))
    )
    # The mode is read at call time, as nn.BatchNorm does: eval mode with running
    # statistics uses them; otherwise per-task batch statistics, running statistics
    # neither read nor written (pymeta.core.norms).
    if module.training or module.running_mean is None:
        return weight, bias, None, None
    mean, var = (_per_task(get(weights, n), 1, num_tasks).flatten() for n in ("running_mean", "running_var"))
    return weight, bias, mean, var


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, prefix: str) -> Layer:
    def batch_norm(weights: dict[str, Tensor], x: Tensor, record: Stats | None) -> Tensor:
        # Tasks folded into channels, [B, T*C, ...] (see _norm_arguments).
        folded, weight, bias, mean, var = _norm_arguments(module, prefix, weights, x, record)
        out = F.batch_norm(folded, mean, var, weight, bias, mean is None, 0.0, module.eps)
        return _unfold_tasks(out, x.shape[0])

    return batch_norm


def _batch_norm_relu_pool(norm: nn.BatchNorm2d, pool: nn.MaxPool2d, relu: nn.ReLU, prefix: str) -> Layer:
    """``BatchNorm2d, MaxPool2d(2), ReLU`` as :func:`pymeta.ops.batch_norm_relu_pool` where
    that is faster: CPU float32 / float64 planes, eagerly at least :data:`FUSED_MIN_WIDTH`
    wide, under ``torch.compile`` at any width (Inductor's own loops for the three layers
    and their double backward were slower: conv4 second-order MAML, 8 tasks, compiled
    step 1.41 s with them, 0.93 s with the op; and generating them for conv4's 7- and
    3-wide blocks took time: at 32 tasks, cold compile 104 -> 51 s, step 5.2 -> 4.4 s, one
    paired run). Elsewhere the three layers as they are."""
    separate = [_batch_norm(norm, prefix), _max_pool2d(pool, ""), _lower(relu, "")]

    def batch_norm_relu_pool(weights: dict[str, Tensor], x: Tensor, record: Stats | None) -> Tensor:
        if not _fusable(x, x.shape[-1]):
            for layer in separate:
                x = layer(weights, x, record)
            return x
        folded, weight, bias, mean, var = _norm_arguments(norm, prefix, weights, x, record)
        return _unfold_tasks(ops.batch_norm_relu_pool(folded, weight, bias, mean, var, norm.eps), x.shape[0])

    return batch_norm_relu_pool


def _conv_batch_norm_relu_pool(conv: nn.Conv2d, conv_prefix: str, tail: list[nn.Module], tail_prefix: str) -> Layer:
    """A first block, ``Conv2d`` of few input channels (stride 1) then ``BatchNorm2d,
    MaxPool2d(2), ReLU``, as :func:`pymeta.ops.conv2d_batch_norm_relu_pool` where
    :func:`_batch_norm_relu_pool` would fuse the tail and nothing records batch
    statistics; elsewhere the convolution and the tail as they are."""
    separate = [_conv2d(conv, conv_prefix), _batch_norm_relu_pool(*tail, tail_prefix)]
    get, norm = _getter(conv, conv_prefix), tail[0]
    (ph, pw), kw = conv.padding, conv.kernel_size[1]

    def conv_batch_norm_relu_pool(weights: dict[str, Tensor], x: Tensor, record: Stats | None) -> Tensor:
        if record is not None or not _fusable(x, x.shape[-1] + 2 * pw - kw + 1):  # width: the convolution's output
            for layer in separate:
                x = layer(weights, x, record)
            return x
        num_tasks = x.shape[0]
        weight, bias = _per_task(get(weights, "weight"), 4, num_tasks), _per_task(get(weights, "bias"), 1, num_tasks)
        out = ops.conv2d_batch_norm_relu_pool(
            _fold_tasks(x), weight.flatten(0, 1), None if bias is None else bias.flatten(),
            *_norm_parameters(norm, tail_prefix, weights, num_tasks), norm.eps, (ph, pw), num_tasks * conv.groups,
        )
        return _unfold_tasks(out, num_tasks)

    return conv_batch_norm_relu_pool


def _is_first_conv(module: nn.Module) -> bool:
    """A ``Conv2d`` that :func:`pymeta.ops.conv2d_batch_norm_relu_pool` runs: stride 1, zero padding, few inputs."""
    return (
        type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
        and _pair(module.stride) == (1, 1) and _pair(module.dilation) == (1, 1)
        and _few_inputs(module)
    )  # fmt: skip


def _layer_norm(module: nn.LayerNorm, prefix: str) -> Layer:
    get = _getter(module, prefix)

    def layer_norm(weights: dict[str, Tensor], x: Tensor, record: Stats | None) -> Tensor:
        weight, bias = get(weights, "weight"), get(weights, "bias")
        shape = module.normalized_shape
        if (weight is None or weight.dim() == len(shape)) and (bias is None or bias.dim() == len(shape)):
            return F.layer_norm(x, shape, weight, bias, module.eps)
        out = F.layer_norm(x, shape, None, None, module.eps)
        # [T, *shape] affine broadcast over the example dims between T and `shape`.
        between = [1] * (x.dim() - 1 - len(shape))
        if weight is not None:
            out = out * _per_task(weight, len(shape), x.shape[0]).view(x.shape[0], *between, *shape)
        if bias is not None:
            out = out + _per_task(bias, len(shape), x.shape[0]).view(x.shape[0], *between, *shape)
        return out

    return layer_norm


def _max_pool2d(module: nn.MaxPool2d, prefix: str) -> Layer:
    options = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
               module.return_indices)  # fmt: skip
    # pymeta's max_pool2d: F.max_pool2d's results with a faster CPU path.
    return lambda weights, x, record: max_pool2d(x.flatten(0, 1), *options).unflatten(0, x.shape[:2])


def _adaptive_max_pool2d(module: nn.AdaptiveMaxPool2d, prefix: str) -> Layer:
    # pymeta's adaptive_max_pool2d: F.adaptive_max_pool2d's results with a faster CPU path.
    return lambda weights, x, record: adaptive_max_pool2d(
        x.flatten(0, 1), module.output_size, module.return_indices
    ).unflatten(0, x.shape[:2])


LOWERINGS: dict[type[nn.Module], Callable[[nn.Module, str], Layer]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.MaxPool2d: _max_pool2d,
    nn.AdaptiveMaxPool2d: _adaptive_max_pool2d,
}
