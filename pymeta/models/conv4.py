"""The four-block convolutional backbone of MAML, Matching Networks and ProtoNet."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pymeta import _validate


def _block(in_channels: int, out_channels: int, track_running_stats: bool) -> nn.Sequential:
    """conv3x3 (same padding) -> BatchNorm -> ReLU -> maxpool 2: halves H and W (rounding down)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def conv4(
    in_channels: int = 1,
    n_way: int | None = 5,
    hidden: int = 64,
    image_size: int = 28,
    track_running_stats: bool = True,
) -> nn.Sequential:
    """Conv4: 4 x (conv3x3 -> BatchNorm -> ReLU -> maxpool2), flatten, and a linear head.

    Forward: ``x [B, in_channels, image_size, image_size] -> [B, n_way]``, or with
    ``n_way=None`` the feature encoder ``-> [B, hidden * (image_size // 16)^2]``: 64
    features for 28x28 Omniglot, 1600 for 84x84 miniImageNet.

    Children are named ``block1..block4``, ``flatten`` and ``head``, so ``model[:-1]``
    is the encoder and ``model.head`` the classifier (e.g. for ANIL). Attributes:
    ``feature_size`` (encoder width) and ``out_features`` (output width).

    ``hidden=64`` is ProtoNet's and MAML's Omniglot width (MAML uses 32 on
    miniImageNet). ``track_running_stats=False`` normalises with batch statistics at
    test time too, as the MAML reference code does; pymeta's ``episode`` uses batch
    statistics per task either way.
    """
    _validate.positive_int("in_channels", in_channels)
    _validate.positive_int("hidden", hidden)
    _validate.positive_int("image_size", image_size)
    if n_way is not None:
        _validate.positive_int("n_way", n_way)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for four 2x2 poolings, got {image_size}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(4):
        layers[f"block{i + 1}"] = _block(in_channels if i == 0 else hidden, hidden, track_running_stats)
    layers["flatten"] = nn.Flatten()
    side = image_size // 16  # each maxpool floors, and floor(floor(n/2)/2) = floor(n/4)
    features = hidden * side * side
    if n_way is not None:
        layers["head"] = nn.Linear(features, n_way)
    model = nn.Sequential(layers)
    model.feature_size = features
    model.out_features = features if n_way is None else n_way
    return model
