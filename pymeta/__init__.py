"""pymeta: fast, batched few-shot meta-learning for PyTorch."""

from pymeta import ops
from pymeta.algorithms import ANIL, MAML, MANN, FineTune, MetaSGD, ProtoNet, Reptile
from pymeta.cuda_graph import CUDAGraphStep

__version__ = "0.1.0"
__all__ = ["ANIL", "MAML", "MANN", "CUDAGraphStep", "FineTune", "MetaSGD", "ProtoNet", "Reptile", "__version__", "ops"]
