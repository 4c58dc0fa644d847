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
