"""The fully connected ReLU network of the MAML sinusoid experiments."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from pymeta import _validate


def mlp(in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear``; the MAML sinusoid regressor (1-40-40-1) by default.

    Forward: ``x [B, in_features] -> [B, out_features]``. ``hidden=()`` gives a single
    linear layer. The returned ``nn.Sequential`` carries ``in_features`` and
    ``out_features`` attributes for code that builds heads on top of it.
    """
    _validate.positive_int("in_features", in_features)
    _validate.positive_int("out_features", out_features)
    for i, width in enumerate(hidden):
        _validate.positive_int(f"hidden[{i}]", width)
    sizes = [in_features, *hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], out_features))
    model = nn.Sequential(*layers)
    model.in_features = in_features
    model.out_features = out_features
    return model
