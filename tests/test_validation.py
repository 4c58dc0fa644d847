"""Bad input raises a clear error naming the argument, the expected and the actual."""

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp

import pymeta


@pytest.fixture
def maml():
    return pymeta.MAML(mlp(), lr=0.1)


def test_mismatched_task_dims(maml):
    with pytest.raises(ValueError, match=r"support_x and query_x must agree on the number of tasks T.*\(3, 5, 1\).*\(4, 6, 1\)"):
        maml.episode(torch.randn(3, 5, 1), torch.randn(3, 5, 1), torch.randn(4, 6, 1))


def test_support_y_must_match_support_x(maml):
    with pytest.raises(ValueError, match=r"support_y must start with the \[T, S\] = \(3, 5\).*\(3, 4, 1\)"):
        maml.episode(torch.randn(3, 5, 1), torch.randn(3, 4, 1), torch.randn(3, 6, 1))


def test_example_shapes_must_match(maml):
    with pytest.raises(ValueError, match=r"same example shape"):
        maml.episode(torch.randn(3, 5, 1), torch.randn(3, 5, 1), torch.randn(3, 6, 2))


def test_labels_of_wrong_dtype_for_cross_entropy():
    maml = pymeta.MAML(mlp(out_features=3), lr=0.1, loss_fn=F.cross_entropy)
    with pytest.raises(TypeError, match=r"support_y must hold integer class labels.*torch.float32"):
        maml.episode(torch.randn(2, 6, 1), torch.zeros(2, 6), torch.randn(2, 4, 1))


def test_labels_of_wrong_rank():
    maml = pymeta.MAML(mlp(out_features=3), lr=0.1)
    with pytest.raises(ValueError, match=r"support_y must have 2 dims \[T, S\] of class labels, got shape \(2, 6, 1\)"):
        maml.episode(torch.randn(2, 6, 1), torch.zeros(2, 6, 1, dtype=torch.long), torch.randn(2, 4, 1))


def test_inputs_must_be_floating_tensors(maml):
    with pytest.raises(TypeError, match=r"support_x must be a floating-point tensor, got dtype torch\.int64"):
        maml.episode(torch.zeros(2, 6, 1, dtype=torch.long), torch.randn(2, 6, 1), torch.randn(2, 4, 1))
    with pytest.raises(TypeError, match=r"query_x must be a torch\.Tensor, got list"):
        maml.episode(torch.randn(2, 6, 1), torch.randn(2, 6, 1), [[0.0]])
    with pytest.raises(ValueError, match=r"support_x must have .* dims \[T, S, \.\.\.\], got shape \(6,\)"):
        maml.episode(torch.randn(6), torch.randn(6), torch.randn(4))


@pytest.mark.parametrize("steps", [-1, -5])
def test_negative_steps(steps):
    with pytest.raises(ValueError, match=rf"steps must be >= 0, got {steps}"):
        pymeta.MAML(mlp(), lr=0.1, steps=steps)


def test_non_int_steps():
    with pytest.raises(TypeError, match=r"steps must be an int, got float 1\.5"):
        pymeta.MAML(mlp(), lr=0.1, steps=1.5)


def test_lr_of_wrong_shape_or_value():
    with pytest.raises(ValueError, match=r"lr must be a float or a 0-dim tensor, got a tensor of shape \(3,\)"):
        pymeta.MAML(mlp(), lr=torch.ones(3))
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.1"):
        pymeta.MAML(mlp(), lr=-0.1)
    with pytest.raises(TypeError, match=r"lr must be a float, got str"):
        pymeta.MAML(mlp(), lr="0.1")


def test_unknown_strategy_and_bad_model():
    with pytest.raises(ValueError, match=r"strategy must be one of"):
        pymeta.MAML(mlp(), lr=0.1, strategy="fast")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn.Module, got function"):
        pymeta.MAML(lambda x: x, lr=0.1)


def test_a_forgotten_task_dim_is_an_error_naming_the_first_layer(maml):
    """[S, 1] inputs used to pass as S tasks of one scalar example each."""
    x = torch.randn(5, 1)
    with pytest.raises(ValueError, match=(
        r"support_x must be \[T, S, \*example\] with examples of shape \[\.\.\., 1\] for the model's first "
        r"layer '0' \(Linear\(in_features=1, .*\)\), got shape \(5, 1\), i.e. examples of shape \[\]; a 2-D "
        r"support_x is read as \[T, S\] = \(5, 1\), 5 tasks of scalar examples: if it holds one task's "
        r"examples, add the task dim \(support_x.unsqueeze\(0\)\)")):
        maml.episode(x, x, x)
    assert maml.episode(x[None], x[None], x[None]).shape == (1, 5, 1)
    with pytest.raises(ValueError, match=r"examples of shape \[\.\.\., 1\] .* got shape \(1, 5, 3\)"):
        maml.episode(torch.randn(1, 5, 3), torch.randn(1, 5, 1), torch.randn(1, 2, 3))


@pytest.mark.parametrize("algo", ["maml", "reptile", "anil", "protonet", "finetune"])
def test_every_learner_checks_examples_against_a_conv_first_layer(algo):
    """An image batch with the wrong channel count fails in the check, naming the layer
    (before, in a strategy's kernels: e.g. a RuntimeError from the lowered conv)."""
    from pymeta.models import conv4

    net = conv4(in_channels=1, n_way=3, image_size=16, hidden=4)
    learner = {
        "maml": lambda: pymeta.MAML(net, lr=0.1), "reptile": lambda: pymeta.Reptile(net, 0.1, 1),
        "anil": lambda: pymeta.ANIL(net[:-1], net[-1], 0.1, 1),
        "protonet": lambda: pymeta.ProtoNet(net[:-1]), "finetune": lambda: pymeta.FineTune(net[:-1], 3, 0.1, 1, base_classes=5, feature_dim=4),
    }[algo]()
    x, y = torch.randn(2, 3, 3, 16, 16), torch.arange(3).repeat(2, 1)
    with pytest.raises(ValueError, match=r"examples of shape \[1, H, W\] for the model's first layer "
                                         r"'(block1\.)?0' \(Conv2d\(1, 4, .*got shape \(2, 3, 3, 16, 16\)"):
        learner.outer_grad(x, y) if algo == "reptile" else learner.episode(x, y, x)


def test_a_model_whose_first_layer_is_not_known_gets_a_warning_for_2d_inputs():
    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * x

    maml = pymeta.MAML(Scalar(), lr=0.1, loss_fn=F.mse_loss, strategy="vmap")
    x = torch.randn(5, 1)
    with pytest.warns(UserWarning, match=r"support_x has shape \(5, 1\), read as \[T, S\] = \(5, 1\): 5 tasks of 1 "
                                         r"scalar examples; if it holds one task's examples, add the task dim"):
        assert maml.episode(x, x, x).shape == (5, 1)


def test_protonet_names_a_query_class_missing_from_every_support_set():
    """Class 4 absent from all support sets: N was inferred as 4 and the loss failed with
    'IndexError: Target 4 is out of bounds'."""
    from pymeta.algorithms.base import episode_loss

    proto = pymeta.ProtoNet(torch.nn.Sequential(torch.nn.Linear(3, 4)))
    support_y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).repeat(2, 1)
    query_y = torch.tensor([0, 1, 2, 3, 4]).repeat(2, 1)
    episode = (torch.randn(2, 8, 3), support_y, torch.randn(2, 5, 3), query_y)
    message = (r"query_y\[0, 4\] = 4, but class 4 has no support example in any task: ProtoNet took N = 4 classes "
               r"from support_y \(its largest label \+ 1\), so there is no prototype for class 4")
    with pytest.raises(ValueError, match=message):
        episode_loss(proto, *episode, F.cross_entropy)
    with pytest.raises(ValueError, match=message):
        proto.meta_loss(*episode, task_chunk=1)
    with pytest.raises(ValueError, match=r"class 4 has no example in task 0 of support_y"):
        episode_loss(pymeta.ProtoNet(proto.encoder, n_way=5), *episode, F.cross_entropy)
