"""ResNet-12, the standard few-shot backbone of MetaOptNet, TADAM, FEAT and RFS."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

from pymeta import _validate


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """Three conv3x3-BN layers (LeakyReLU 0.1 between) plus a conv1x1-BN shortcut, then
    LeakyReLU and maxpool 2: ``[B, C_in, H, W] -> [B, C_out, H // 2, W // 2]``.

    Out-of-place activations only: the engine runs this under ``torch.vmap``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """Four residual blocks, global average pooling and an optional linear ``head``.

    ``[B, in_channels, H, W] -> [B, channels[-1]]`` (features) or ``[B, n_way]``.
    ``out_features`` is the output width; ``feature_size`` the encoder's.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], n_way: int | None) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*(ResidualBlock(a, b) for a, b in itertools.pairwise(widths)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels[-1], n_way) if n_way is not None else nn.Identity()
        self.feature_size = channels[-1]
        self.out_features = channels[-1] if n_way is None else n_way
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # The initialisation of the reference implementations (MetaOptNet, RFS).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(self.pool(self.blocks(x))))


def resnet12(
    in_channels: int = 3,
    n_way: int | None = None,
    channels: Sequence[int] = (64, 160, 320, 640),
    width: float = 1.0,
) -> ResNet12:
    """ResNet-12: ``x [B, in_channels, H, W] -> [B, 640]`` features (or ``[B, n_way]`` logits).

    ``channels`` are the four block widths (TADAM's 64-128-256-512 is the other common
    choice); ``width`` scales them all, e.g. 0.25 for a quick CPU model. Any ``H, W >= 16``
    works (global average pooling); 84x84 gives 5x5 maps before pooling. DropBlock, used
    by some reference trainings, is left out: it is a training regulariser, not part of
    the architecture.
    """
    _validate.positive_int("in_channels", in_channels)
    if n_way is not None:
        _validate.positive_int("n_way", n_way)
    _validate.positive_float("width", width)
    if len(channels) != 4:
        raise ValueError(f"channels must list 4 block widths, got {tuple(channels)}")
    for i, c in enumerate(channels):
        _validate.positive_int(f"channels[{i}]", c)
    return ResNet12(in_channels, [max(1, round(c * width)) for c in channels], n_way)
