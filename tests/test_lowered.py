"""The "lowered" strategy: every supported layer equals the per-task loop, in float64."""

import pytest
import torch
from helpers import needs_cpp
from torch import nn

import pymeta
from pymeta.core.batched import TaskBatched
from pymeta.core.lowered import NotLowerable
from pymeta.models import resnet12

T, B = 3, 4

MODELS = {
    # (model, example shape without the [T, B] dims)
    "linear_nobias_3d_input": (lambda: nn.Sequential(nn.Linear(5, 6, bias=False), nn.GELU(), nn.Linear(6, 2)), (7, 5)),
    "layernorm_2d_noaffine": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm((6,), elementwise_affine=False), nn.SiLU(),
                              nn.Linear(6, 3), nn.LayerNorm(3)),
        (4,),
    ),
    "batchnorm1d_noaffine_seq": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(2, 3), nn.BatchNorm1d(4, affine=False), nn.Flatten(),
                              nn.Linear(4 * 9, 2)),
        (2, 5, 5),
    ),
    "conv_grouped_strided_pool": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(6), nn.LeakyReLU(0.1),
            nn.Sequential(nn.Conv2d(6, 4, 2, dilation=2, bias=False), nn.AdaptiveAvgPool2d(1)),
            nn.Flatten(start_dim=-3), nn.Linear(4, 3),
        ),
        (4, 9, 9),
    ),
    # conv4 blocks wide enough for the fused BatchNorm + max-pool + ReLU kernel, in both
    # orders of the last two, odd heights and widths (a row / column pooled away).
    "conv_blocks_fused": (
        lambda: nn.Sequential(
            # A first block of 1 input channel (fused from the convolution on), then one of
            # 4 (the convolution stays oneDNN's, the tail is fused).
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * 4 * 8, 2),
        ),
        (1, 17, 34),
    ),
    # 3x3 layers of 16 channels on planes >= 10 a side: Winograd's C++ kernels on CPU,
    # padding 1 and 2 (their input gradients: padding 1 and 0), an odd height.
    "conv_winograd": (
        lambda: nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=2, bias=False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
        ),
        (16, 11, 12),
    ),
}


def fast_weights(model: nn.Module, frozen: set[str]) -> dict[str, torch.Tensor]:
    """Distinct per-task weights for every parameter not in ``frozen`` (those stay shared)."""
    return {
        name: p.detach().unsqueeze(0) + 0.1 * torch.randn(T, *p.shape, dtype=p.dtype)
        for name, p in model.named_parameters() if name not in frozen
    }


@pytest.mark.parametrize("freeze_first_layer", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_lowered_equals_per_task_loop_values_and_gradients(name, freeze_first_layer):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    frozen = {n for n, _ in model.named_parameters() if n.startswith("0.")} if freeze_first_layer else set()
    weights = {n: w.requires_grad_() for n, w in fast_weights(model, frozen).items()}
    x = torch.randn(T, B, *shape, dtype=torch.float64, requires_grad=True)
    batched = TaskBatched(model)
    out = {s: batched.forward(weights, x, s) for s in ("lowered", "loop")}
    torch.testing.assert_close(out["lowered"], out["loop"], rtol=1e-12, atol=1e-12)
    # First and second derivatives (what second-order MAML differentiates) agree too.
    probe = torch.randn_like(out["loop"])
    inputs = [x, *weights.values(), *(p for n, p in model.named_parameters() if n in frozen)]
    grads = {}
    for s, o in out.items():
        first = torch.autograd.grad((o * probe).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), inputs, allow_unused=True)
        grads[s] = [*first, *(torch.zeros(()) if g is None else g for g in second)]
    for lowered, loop in zip(grads["lowered"], grads["loop"], strict=True):
        # atol: second derivatives of order 1 summed in another order differ by ~1e-12.
        torch.testing.assert_close(lowered, loop, rtol=1e-10, atol=1e-10)


def test_auto_candidates_and_forced_lowered_on_a_model_it_cannot_lower():
    assert TaskBatched(nn.Sequential(nn.Linear(2, 2))).candidates() == ("lowered", "loop")
    model = resnet12(in_channels=1, channels=(4, 4, 4, 4), n_way=3)
    assert TaskBatched(model).candidates() == ("vmap", "loop")
    with pytest.raises(NotLowerable, match=r"cannot run the model \(ResNet12\).*use strategy='vmap' or 'auto'"):
        pymeta.MAML(model, lr=0.1, strategy="lowered")
    with pytest.raises(NotLowerable, match=r"cannot run '1.0' \(ResidualBlock\)"):
        pymeta.MAML(nn.Sequential(nn.Identity(), model.blocks.__class__(*model.blocks)), lr=0.1, strategy="lowered")
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(NotLowerable, match=r"'0'.*padding_mode 'reflect'"):
        pymeta.MAML(reflect, lr=0.1, strategy="lowered")
    assert pymeta.MAML(reflect, lr=0.1)._picker._times.keys() == {"vmap", "loop"}


def test_lowered_batch_norm_leaves_running_stats_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(T, B, 3, dtype=torch.float64)
    TaskBatched(model).forward(fast_weights(model, set()), x, "lowered")
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_relu_then_max_pool_reordered_exactly_even_with_ties():
    """The lowered Sequential pools before the ReLU (cheaper); values, gradients and
    second derivatives stay bitwise those of the model's own order, ties included."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()).double()
    # Integer-valued inputs and 1x1 conv weights: exact arithmetic whatever the kernel,
    # and many windows tie (at zero and above).
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, 2.0]]).view(3, 2, 1, 1))
        model[0].bias.zero_()
    weights = {n: w.requires_grad_() for n, w in fast_weights(model, {"0.weight", "0.bias"}).items()}
    x = torch.randint(-2, 3, (T, B, 2, 4, 4)).double().requires_grad_()
    batched = TaskBatched(model)
    outs = {s: batched.forward(weights, x, s) for s in ("lowered", "loop")}
    assert torch.equal(outs["lowered"], outs["loop"])
    derivatives = {}
    for s, out in outs.items():
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        probe = torch.arange(gx.numel(), dtype=gx.dtype).view_as(gx)  # distinct weights per entry
        derivatives[s] = (gx, *torch.autograd.grad((gx * probe).sum(), [x, *weights.values()], allow_unused=True))
    for a, b in zip(derivatives["lowered"], derivatives["loop"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_cpp
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_conv_blocks_run_the_fused_kernel_and_equal_the_loop(mode):
    build, shape = MODELS["conv_blocks_fused"]
    torch.manual_seed(1)
    model = build().double()
    if mode == "eval":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
    weights = {n: w.requires_grad_() for n, w in fast_weights(model, set()).items()}
    x = torch.randn(T, B, *shape, dtype=torch.float64)  # images: no gradient (else the first block is two ops)
    batched = TaskBatched(model)
    pymeta.ops.reset_usage()
    lowered = batched.forward(weights, x, "lowered")
    used = {(op, backend) for op, backend, _, _ in pymeta.ops.usage()}
    assert {("conv2d_batch_norm_relu_pool", "cpp"), ("batch_norm_relu_pool", "cpp")} <= used, used
    loop = batched.forward(weights, x, "loop")
    torch.testing.assert_close(lowered, loop, rtol=1e-12, atol=1e-12)
    inputs = list(weights.values())
    pymeta.ops.reset_usage()
    fused_grads = torch.autograd.grad(lowered.square().sum(), inputs)  # the C++ backward
    used = {(op, backend) for op, backend, _, _ in pymeta.ops.usage()}
    assert {("conv2d_batch_norm_relu_pool_backward", "cpp"), ("batch_norm_relu_pool_backward", "cpp")} <= used, used
    for fused, reference in zip(fused_grads, torch.autograd.grad(loop.square().sum(), inputs), strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)


@needs_cpp
def test_winograd_layers_run_the_cpp_kernels_and_equal_the_loop_to_second_order():
    build, shape = MODELS["conv_winograd"]
    torch.manual_seed(2)
    model = build().double()
    weights = {n: w.requires_grad_() for n, w in fast_weights(model, set()).items()}
    x = torch.randn(T, B, *shape, dtype=torch.float64, requires_grad=True)
    batched = TaskBatched(model)
    derivatives = {}
    for strategy in ("lowered", "loop"):
        pymeta.ops.reset_usage()
        out = batched.forward(weights, x, strategy)
        inputs = [x, *weights.values()]
        first = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), inputs)
        derivatives[strategy] = (out, *first, *second)
        if strategy == "lowered":
            used = {(op, backend) for op, backend, _, _ in pymeta.ops.usage()}
            wanted = {(op, "cpp") for op in ("grouped_conv2d", "grouped_conv2d_input_grad", "grouped_conv2d_weight_grad")}
            assert wanted <= used, used
    for a, b in zip(derivatives["lowered"], derivatives["loop"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_second_order_step_runs_as_many_convolutions_for_any_number_of_tasks():
    """The tasks of a conv layer run as the groups of one convolution, whose double backward
    ATen computes one group (task) at a time; pymeta.ops.grouped_conv2d's does not, so a
    second-order meta-step of 5 tasks runs as many convolutions as one of 2 tasks."""
    from helpers import classification_episode, conv_bn

    def convolutions(tasks: int) -> int:
        maml = pymeta.MAML(conv_bn().double(), lr=0.3, strategy="lowered")
        with torch.profiler.profile() as prof:
            pymeta.algorithms.episode_loss(maml, *classification_episode(tasks), loss_fn=nn.functional.cross_entropy).backward()
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::_convolution", "aten::convolution_backward"))

    assert convolutions(5) == convolutions(2) > 0
