"""Meta-learning algorithms, each an ``nn.Module`` with a batched ``episode`` method."""

from pymeta.algorithms.maml import MAML

__all__ = ["MAML"]
