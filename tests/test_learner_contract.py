"""The learner contract: every algorithm is a ``Learner``, and a new one is one class that
the command's training loop picks up without edits elsewhere."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymeta
from pymeta import training
from pymeta.algorithms import LEARNERS, Learner


def test_every_command_algorithm_is_a_registered_learner():
    assert {"maml", "fomaml", "metasgd", "anil", "reptile", "protonet", "finetune"} <= set(LEARNERS)
    for name, cls in LEARNERS.items():
        assert issubclass(cls, Learner) and name in cls.cli_names


def test_inner_steps_is_settable_where_learners_adapt():
    model = nn.Linear(4, 3)
    maml = pymeta.MAML(model, lr=0.1, steps=2)
    maml.inner_steps = 5
    assert maml.steps == 5 and maml.inner_steps == 5
    anil = pymeta.ANIL(nn.Identity(), nn.Linear(4, 3), lr=0.1, steps=2)
    anil.inner_steps = 3
    assert anil.head.steps == 3 and anil.steps == 3
    proto = pymeta.ProtoNet(nn.Identity())
    assert proto.inner_steps is None
    with pytest.raises(AttributeError, match="ProtoNet takes no inner steps"):
        proto.inner_steps = 1
    with pytest.raises(ValueError, match="inner_steps must be >= 0, got -1"):
        maml.inner_steps = -1


def test_capture_blockers_name_the_option_and_the_fix():
    assert pymeta.MAML(nn.Linear(4, 3), lr=0.1).capture_blockers() == []
    (blocker,) = pymeta.MAML(nn.Linear(4, 3), lr=0.1, check_finite=True).capture_blockers()
    assert blocker.startswith("learner has check_finite=True") and "check_finite=False" in blocker
    assert any("n_way=N" in b for b in pymeta.ProtoNet(nn.Identity()).capture_blockers())


def test_a_taken_command_name_is_refused():
    with pytest.raises(ValueError, match="pymeta train --algo 'maml' is taken by MAML"):
        type("Clash", (Learner,), {}, cli=("maml",))


class NearestMean(Learner):
    """A learner written the way a user would add one: regression by the support mean
    plus a learned offset (enough to train and evaluate through the command)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(1))

    def episode(self, support_x, support_y, query_x):
        mean = support_y.mean(1, keepdim=True)  # [T, 1, 1]
        return (mean + self.offset).expand(-1, query_x.shape[1], -1)

    @classmethod
    def from_config(cls, config, data):
        return cls()


@pytest.fixture
def registered():
    """``NearestMean`` under ``--algo nearest-mean`` for one test."""
    LEARNERS["nearest-mean"] = NearestMean
    yield "nearest-mean"
    del LEARNERS["nearest-mean"]


def test_a_new_learner_trains_through_the_command_loop(registered, tmp_path):
    config = training.TrainConfig(algo=registered, data="sinusoid", iterations=20, meta_batch=4, val_every=10,
                                  val_episodes=8, eval_episodes=8, out=str(tmp_path / "m.pt"), outer_lr=0.05)
    result = training.train(config, progress=False, log=lambda line: None)
    assert isinstance(result.learner, NearestMean)
    assert len(result.losses) == 20 and result.test_before is None
    assert result.learner.offset.grad is not None  # the default train_step back-propagated
    with pytest.raises(ValueError, match="task_chunk only applies to algo"):
        training.TrainConfig(algo=registered, data="sinusoid", task_chunk=2).resolved()


def test_outer_loss_is_meta_loss_with_a_task_chunk():
    torch.manual_seed(0)
    sx, qx = torch.randn(3, 4, 2), torch.randn(3, 5, 2)
    sy, qy = torch.randint(0, 3, (3, 4)), torch.randint(0, 3, (3, 5))
    maml = pymeta.MAML(nn.Linear(2, 3), lr=0.1, strategy="loop")
    plain = maml.outer_loss(sx, sy, qx, qy, F.cross_entropy)
    maml.task_chunk = 1
    chunked = maml.outer_loss(sx, sy, qx, qy, F.cross_entropy)
    torch.testing.assert_close(chunked, plain)
