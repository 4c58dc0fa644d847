"""pymeta: fast, batched few-shot meta-learning for PyTorch."""

from pymeta import ops
from pymeta.algorithms import MAML

__version__ = "0.1.0"
__all__ = ["MAML", "__version__", "ops"]
