"""Meta-learning algorithms: each a :class:`Learner` (an ``nn.Module`` with a batched ``episode``)."""

from pymeta.algorithms.anil import ANIL
from pymeta.algorithms.base import LEARNERS, Learner, episode_loss
from pymeta.algorithms.finetune import FineTune
from pymeta.algorithms.maml import MAML
from pymeta.algorithms.mamlpp import MAMLpp
from pymeta.algorithms.mann import MANN
from pymeta.algorithms.matchingnet import MatchingNet
from pymeta.algorithms.metasgd import MetaSGD
from pymeta.algorithms.protonet import ProtoNet
from pymeta.algorithms.relationnet import RelationNet
from pymeta.algorithms.reptile import Reptile

__all__ = [
    "ANIL", "LEARNERS", "MAML", "MANN", "FineTune", "Learner", "MAMLpp", "MatchingNet", "MetaSGD", "ProtoNet",
    "RelationNet", "Reptile", "episode_loss",
]
