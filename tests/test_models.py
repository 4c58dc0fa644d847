"""Backbones: output shapes, and batched evaluation over per-task weights with vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import report
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state

from pymeta.models import conv4, mlp, resnet12


def per_task(model_fn, tasks: int) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """A base module plus T independently initialised parameter sets stacked to ``[T, ...]``."""
    models = [model_fn() for _ in range(tasks)]
    for m in models:
        m.eval()  # running statistics: BatchNorm does not update buffers under vmap
    params, buffers = stack_module_state(models)
    return models[0], params, {k: v[0] for k, v in buffers.items()}


def batched(base: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
    """``x [T, B, ...] -> [T, B, out]``, task t evaluated with ``params[...][t]``."""
    return torch.vmap(lambda p, xt: functional_call(base, (p, buffers), (xt,)))(params, x)


def looped(base: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.stack([
        functional_call(base, ({k: v[t] for k, v in params.items()}, buffers), (x[t],)) for t in range(x.shape[0])
    ])  # fmt: skip


def test_mlp_shapes() -> None:
    model = mlp()
    assert model(torch.randn(7, 1)).shape == (7, 1)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [40, 40, 1]
    assert mlp(3, hidden=(), out_features=5)(torch.randn(2, 3)).shape == (2, 5)
    assert mlp(2, hidden=(8, 8, 8), out_features=4).out_features == 4


def test_conv4_shapes() -> None:
    model = conv4()
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 5)
    encoder = conv4(n_way=None)
    assert encoder(torch.randn(4, 1, 28, 28)).shape == (4, 64) and encoder.out_features == 64
    mini = conv4(in_channels=3, n_way=None, hidden=32, image_size=84)
    assert mini(torch.randn(2, 3, 84, 84)).shape == (2, 32 * 5 * 5) and mini.feature_size == 800
    # The encoder part and the head are addressable by name (ANIL-style splits).
    assert model[:-1](torch.randn(2, 1, 28, 28)).shape == (2, 64)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 64


def test_resnet12_shapes() -> None:
    full = resnet12()
    assert full.out_features == 640
    assert [b.conv1.out_channels for b in full.blocks] == [64, 160, 320, 640]
    params = sum(p.numel() for p in full.parameters())
    assert 12.0e6 < params < 12.7e6  # the usual 12.4M of the few-shot literature
    small = resnet12(in_channels=3, n_way=5, width=0.25)
    assert [b.conv1.out_channels for b in small.blocks] == [16, 40, 80, 160]
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    encoder = resnet12(in_channels=1, channels=(8, 8, 16, 16))
    assert encoder(torch.randn(2, 1, 28, 28)).shape == (2, 16)


def test_mlp_under_vmap_matches_per_task_loop() -> None:
    base, params, buffers = per_task(mlp, tasks=4)
    x = torch.randn(4, 10, 1)
    out = batched(base, params, buffers, x)
    expected = looped(base, params, buffers, x)
    report("mlp vmap vs loop", out, expected)
    assert out.shape == (4, 10, 1)
    torch.testing.assert_close(out, expected)


def test_mlp_inner_gradient_under_vmap() -> None:
    """The MAML inner step: per-task ``torch.func.grad`` under vmap equals a per-task loop."""
    base, params, buffers = per_task(mlp, tasks=3)
    x, y = torch.randn(3, 10, 1), torch.randn(3, 10, 1)

    def loss(p: dict[str, Tensor], xt: Tensor, yt: Tensor) -> Tensor:
        return F.mse_loss(functional_call(base, (p, buffers), (xt,)), yt)

    grads = torch.vmap(grad(loss))(params, x, y)
    for t in range(3):
        single = grad(loss)({k: v[t] for k, v in params.items()}, x[t], y[t])
        for name, g in single.items():
            torch.testing.assert_close(grads[name][t], g)


@pytest.mark.parametrize(
    ("name", "model_fn", "shape"),
    [
        ("conv4", lambda: conv4(n_way=5), (1, 28, 28)),
        ("resnet12", lambda: resnet12(in_channels=3, n_way=4, width=0.125), (3, 20, 20)),
    ],
)
def test_conv_backbones_under_vmap_in_eval_mode(name: str, model_fn, shape: tuple[int, ...]) -> None:
    base, params, buffers = per_task(model_fn, tasks=3)
    x = torch.randn(3, 6, *shape)
    out = batched(base, params, buffers, x)
    expected = looped(base, params, buffers, x)
    report(f"{name} vmap vs loop", out, expected)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # Distinct per-task weights really give distinct outputs.
    assert not torch.allclose(out[0], out[1])


def test_forward_leaves_input_untouched() -> None:
    for model, x in ((mlp(), torch.randn(3, 1)), (conv4(), torch.randn(3, 1, 28, 28)),
                     (resnet12(in_channels=1, width=0.125), torch.randn(2, 1, 16, 16))):  # fmt: skip
        before = x.clone()
        model(x)
        assert torch.equal(x, before)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: mlp(hidden=(40, 0)), r"hidden\[1\] must be >= 1"),
        (lambda: mlp(in_features=0), "in_features must be >= 1"),
        (lambda: conv4(image_size=8), "image_size must be >= 16"),
        (lambda: conv4(n_way=0), "n_way must be >= 1"),
        (lambda: resnet12(channels=(64, 160, 320)), "channels must list 4 block widths"),
        (lambda: resnet12(width=0.0), "width must be > 0"),
    ],
)
def test_bad_arguments(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
