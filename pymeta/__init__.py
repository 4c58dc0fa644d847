"""pymeta: fast, batched few-shot meta-learning for PyTorch."""

from pymeta import ops
from pymeta.algorithms import (
    ANIL,
    MAML,
    MANN,
    FineTune,
    MAMLpp,
    MatchingNet,
    MetaSGD,
    ProtoNet,
    RelationNet,
    Reptile,
)
from pymeta.cuda_graph import CUDAGraphStep

__version__ = "0.1.0"
__all__ = [
    "ANIL", "MAML", "MANN", "CUDAGraphStep", "FineTune", "MAMLpp", "MatchingNet", "MetaSGD", "ProtoNet",
    "RelationNet", "Reptile", "__version__", "ops",
]
