"""Input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind/dtype) or ``ValueError`` (wrong shape/value)
with a message naming the argument, what was expected and what was given, so a user
never meets a crash deep inside a kernel or, worse, a silently wrong answer.

The checks that read tensor *values* (label ranges, class counts), which a CUDA-graph
capture defers, are in :mod:`pymeta._value_checks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from pymeta._value_checks import labels_in_range


def tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value: object) -> Tensor:
    t = tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def integer(name: str, value: object) -> Tensor:
    t = tensor(name, value)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of class labels, got dtype {t.dtype}")
    return t


def ndim(name: str, t: Tensor, expected: int | Sequence[int], layout: str = "") -> Tensor:
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    if t.dim() not in allowed:
        want = " or ".join(str(a) for a in allowed)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must have {want} dims{hint}, got shape {tuple(t.shape)}")
    return t


def same_dim(names: tuple[str, str], a: Tensor, b: Tensor, dim: int, what: str) -> None:
    if a.shape[dim] != b.shape[dim]:
        raise ValueError(
            f"{names[0]} and {names[1]} must agree on {what} (dim {dim}): "
            f"{names[0]} has shape {tuple(a.shape)}, {names[1]} has shape {tuple(b.shape)}"
        )


# What a dim letter of a layout such as "[T, Q, D]" counts, for layouts()' messages.
DIM_NAMES = {"T": "the number of tasks T", "S": "the number of support examples S", "D": "the feature size D"}


def layouts(named: dict[str, tuple[Tensor, str]]) -> None:
    """Each tensor has as many dims as its layout (``{"query": (query, "[T, Q, D]")}``), and
    dims with the same letter agree in size across tensors (``T``, ``D``, ...)."""
    for name, (t, layout) in named.items():
        ndim(name, t, layout.count(",") + 1, layout)
    seen: dict[str, tuple[str, Tensor, int]] = {}
    for name, (t, layout) in named.items():
        for d, letter in enumerate(layout.strip("[]").split(", ")):
            if letter not in seen:
                seen[letter] = (name, t, d)
                continue
            first_name, first, first_d = seen[letter]
            if first.shape[first_d] != t.shape[d]:
                dims = f"dim {d}" if d == first_d else f"dims {first_d} and {d}"
                raise ValueError(
                    f"{first_name} and {name} must agree on {DIM_NAMES.get(letter, letter)} ({dims}): "
                    f"{first_name} has shape {tuple(first.shape)}, {name} has shape {tuple(t.shape)}"
                )


def same_device(named: dict[str, Tensor]) -> torch.device:
    devices = {name: t.device for name, t in named.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def positive_int(name: str, value: object) -> int:
    non_negative_int(name, value)
    if value == 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value  # type: ignore[return-value]


def positive_float(name: str, value: object, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not (value >= 0 if allow_zero else value > 0) or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return float(value)


def norm_statistics(running_mean: Tensor | None, running_var: Tensor | None, eps: object) -> float:
    """A BatchNorm op's running statistics (both or neither; buffers, so never requiring
    grad) and its ``eps`` (> 0), returned as a float."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (eval mode) or both be None")
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and stat.requires_grad:
            raise ValueError(f"{name} must not require grad: running statistics are buffers, not differentiated")
    return positive_float("eps", eps)


_CLASSIFICATION_LOSSES = ("cross_entropy", "nll_loss", "multi_margin_loss", "relation_mse_loss")
# Losses that compare prediction and target element by element (and would broadcast
# mismatched shapes into a silently wrong loss).
_ELEMENTWISE_LOSSES = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")


def is_classification_loss(loss_fn: object) -> bool:
    return getattr(loss_fn, "__name__", "") in _CLASSIFICATION_LOSSES


def episode(
    support_x: object,
    support_y: object,
    query_x: object,
    classification: bool | None = None,
    model: torch.nn.Module | None = None,
) -> int:
    """Check an episode's tensors; return the number of tasks T.

    ``support_x: [T, S, ...]`` with S >= 1, ``support_y: [T, S]`` integer labels or
    ``[T, S, ...]`` float targets, ``query_x: [T, Q, ...]`` with the dtype and trailing
    dims of ``support_x``. ``classification=True`` demands integer labels ``[T, S]``.
    With ``model``, the inputs must have its parameters' dtype (outside autocast) and
    examples its first layer takes (:func:`model_input`).
    """
    sx = floating("support_x", support_x)
    sy = tensor("support_y", support_y)
    qx = floating("query_x", query_x)
    ndim("support_x", sx, range(2, 16), "[T, S, ...]")
    ndim("query_x", qx, range(2, 16), "[T, Q, ...]")
    same_dtype(("support_x", "query_x"), sx, qx)
    same_dim(("support_x", "query_x"), sx, qx, 0, "the number of tasks T")
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(
            "support_x [T, S, ...] and query_x [T, Q, ...] must have the same example shape: "
            f"got support_x {tuple(sx.shape)}, query_x {tuple(qx.shape)}"
        )
    if sy.dim() < 2 or sy.shape[:2] != sx.shape[:2]:
        raise ValueError(
            f"support_y must start with the [T, S] = {tuple(sx.shape[:2])} dims of support_x, "
            f"got shape {tuple(sy.shape)}"
        )
    if classification and (sy.is_floating_point() or sy.is_complex()):
        raise TypeError(f"support_y must hold integer class labels (int64) for this loss, got dtype {sy.dtype}")
    if not sy.is_floating_point():
        integer("support_y", sy)
        ndim("support_y", sy, 2, "[T, S] of class labels")
    same_device({"support_x": sx, "support_y": sy, "query_x": qx})
    if sx.shape[0] == 0:
        raise ValueError("support_x must hold at least one task, got T = 0")
    if sx.shape[1] == 0:
        raise ValueError(f"support_x must hold at least one example per task, got S = 0 (shape {tuple(sx.shape)})")
    if model is not None:
        model_dtype("support_x", sx, model)
        model_input("support_x", sx, model)
    return sx.shape[0]


# The examples [C, *spatial] each convolution takes.
_CONV_EXAMPLES = {torch.nn.Conv1d: "L", torch.nn.Conv2d: "H, W", torch.nn.Conv3d: "D, H, W"}


def first_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """``(name, layer)`` of the layer an ``nn.Sequential`` applies first (looking into
    nested ones); None for other models, whose module tree does not tell their order."""
    if not isinstance(model, torch.nn.Sequential):
        return None
    names = []
    while isinstance(model, torch.nn.Sequential):
        if len(model) == 0:
            return None
        name, model = next(iter(model.named_children()))
        names.append(name)
    return ".".join(names), model


def model_input(name: str, x: Tensor, model: torch.nn.Module) -> None:
    """``x: [T, B, ...]`` must hold examples that ``model``'s first layer takes, where that
    is known (an ``nn.Sequential`` starting with ``Linear`` or ``Conv1d/2d/3d``): else a
    forgotten task dim (``[S, D]`` instead of ``[1, S, D]``) would pass as S tasks of
    scalar examples. For other models a 2-D ``x`` gets a warning saying what is assumed.
    """
    example = tuple(x.shape[2:])
    layer_name, layer = first_layer(model) or ("", None)
    if isinstance(layer, torch.nn.Linear) and layer.in_features > 0:  # 0: a LazyLinear not yet built
        fits, want = bool(example) and example[-1] == layer.in_features, f"[..., {layer.in_features}]"
    elif type(layer) in _CONV_EXAMPLES:
        spatial = _CONV_EXAMPLES[type(layer)]
        fits = len(example) == 2 + spatial.count(",") and example[0] == layer.in_channels
        want = f"[{layer.in_channels}, {spatial}]"
    else:
        if x.dim() == 2:
            warnings.warn(
                f"{name} has shape {tuple(x.shape)}, read as [T, S] = {tuple(x.shape)}: {x.shape[0]} tasks of "
                f"{x.shape[1]} scalar examples; if it holds one task's examples, add the task dim "
                f"({name}.unsqueeze(0))", stacklevel=4,
            )
        return
    if not fits:
        missing = (f"; a 2-D {name} is read as [T, S] = {tuple(x.shape)}, {x.shape[0]} tasks of scalar examples: "
                   f"if it holds one task's examples, add the task dim ({name}.unsqueeze(0))") if x.dim() == 2 else ""
        raise ValueError(
            f"{name} must be [T, S, *example] with examples of shape {want} for the model's first layer "
            f"{layer_name!r} ({layer}), got shape {tuple(x.shape)}, i.e. examples of shape {list(example)}{missing}"
        )


def model_dtype(name: str, x: Tensor, model: torch.nn.Module) -> None:
    """``x`` must have the dtype of ``model``'s floating parameters, unless autocast is on
    (which casts both); otherwise the model would fail deep inside a layer."""
    if torch.is_autocast_enabled(x.device.type):
        return
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    if x.dtype != dtype:
        raise TypeError(
            f"{name} must have the dtype of the model's parameters, {dtype}, got {x.dtype}: "
            f"convert the data (episode.to(dtype={dtype})) or the model"
        )


def targets(name: str, pred: Tensor, target: Tensor, loss_fn: object) -> None:
    """Check ``target`` against the model's predictions ``pred: [T, S, ...]`` for ``loss_fn``.

    Classification losses: ``pred`` are logits ``[T, S, C]`` and ``target`` labels in
    ``[0, C)`` (reads the labels: one device sync). Elementwise losses (MSE, L1, ...):
    ``target`` must have ``pred``'s shape, as broadcasting would give a wrong loss.
    Other (custom) losses are the caller's business.
    """
    loss_name = getattr(loss_fn, "__name__", "")
    if loss_name in _ELEMENTWISE_LOSSES and target.shape != pred.shape:
        raise ValueError(
            f"{name} must have the shape of the model's predictions, {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if loss_name not in _CLASSIFICATION_LOSSES:
        return
    if pred.dim() != 3:
        raise ValueError(
            f"{name} holds class labels [T, S], so the model must output logits [T, S, C], got {tuple(pred.shape)}"
        )
    labels_in_range(name, target, pred.shape[-1])



def choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value



def interval(name: str, value: object, strict: bool = False) -> tuple[float, float]:
    """A ``(low, high)`` pair of real numbers with ``low <= high`` (``low < high`` if strict)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pair):
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}")
    low, high = float(pair[0]), float(pair[1])
    if low != low or high != high or (low >= high if strict else low > high):
        relation = "<" if strict else "<="
        raise ValueError(f"{name} must satisfy low {relation} high, got {value!r}")
    return low, high


def tensor_list(name: str, value: object) -> list[Tensor]:
    """``value`` as a list: it must be a list or tuple (of tensors; a lone tensor is refused)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    return list(value)


def same_length(names: tuple[str, str], a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length, got {len(a)} {names[0]} and {len(b)} {names[1]}"
        )


def same_shape(names: tuple[str, str], a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names[1]} must have the shape of {names[0]}, {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def same_dtype(names: tuple[str, str], a: Tensor, b: Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{names[1]} must have the dtype of {names[0]}, {a.dtype}, got {b.dtype}")
