"""Meta-learning algorithms, each an ``nn.Module`` with a batched ``episode`` method."""

from pymeta.algorithms.anil import ANIL
from pymeta.algorithms.finetune import FineTune
from pymeta.algorithms.maml import MAML
from pymeta.algorithms.metasgd import MetaSGD
from pymeta.algorithms.outer_loss import episode_loss
from pymeta.algorithms.protonet import ProtoNet
from pymeta.algorithms.reptile import Reptile

__all__ = ["ANIL", "MAML", "FineTune", "MetaSGD", "ProtoNet", "Reptile", "episode_loss"]
