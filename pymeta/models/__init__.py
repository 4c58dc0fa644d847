"""Standard few-shot backbones, plain ``nn.Module``s that pymeta evaluates batched over tasks."""

from pymeta.models.conv4 import conv4
from pymeta.models.mlp import mlp
from pymeta.models.resnet12 import ResNet12, resnet12

__all__ = ["ResNet12", "conv4", "mlp", "resnet12"]
