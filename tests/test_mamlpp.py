"""MAML++: meta-gradients equal a float64 per-task reference (LSLR, multi-step loss, per-step
BatchNorm weights and statistics), for every strategy, in train and eval mode; the per-step
running statistics are MAMLpp's own and updated as documented; annealing and the command."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_episode,
    conv_bn,
    mlp,
    per_task_sum,
    reference_meta_grads,
    relative_error,
)
from torch import nn
from torch.func import functional_call

import pymeta
from pymeta import checkpoint, cli, models, training
from pymeta.algorithms.mamlpp import importance_vector

STRATEGIES = ["lowered", "vmap", "loop"]


def make(strategy: str = "lowered", steps: int = 2, eval_mode: bool = False, **options) -> pymeta.MAMLpp:
    """A float64 MAMLpp on the BatchNorm conv net whose per-step tensors all differ (rates,
    BatchNorm weights, running statistics), annealed to epoch 3 of a 10-epoch multi-step loss."""
    model = conv_bn().double()
    model.train(not eval_mode)
    options = {"first_order_epochs": 0, **options}
    learner = pymeta.MAMLpp(model, lr=0.3, steps=steps, strategy=strategy, **options)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if learner.step_lrs is not None:
            learner.step_lrs.copy_(0.1 + 0.4 * torch.rand(learner.step_lrs.shape, generator=gen, dtype=torch.float64))
        for step_norm in learner.step_norms.values():
            for name in step_norm.names:
                t = getattr(step_norm, name)
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
                t.copy_(noise.abs() + 0.3 if name in ("weight", "running_var") else noise)
    learner.set_epoch(3)
    return learner


def run(model: nn.Module, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model`` on one task's batch with ``tensors`` (weights and BatchNorm statistics by
    name); native BatchNorm on copies of the other buffers."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**buffers, **tensors}, (x,))


def step_tensors(learner: pymeta.MAMLpp, index: int) -> dict[str, torch.Tensor]:
    """BatchNorm index ``index``'s per-step tensors by the model's names (running
    statistics only for layers in eval mode: in train mode they are not read)."""
    out = {}
    for key, step_norm in learner.step_norms.items():
        name = key.replace("-", ".")
        training = learner.module.get_submodule(name).training
        for t in step_norm.names:
            if not (training and t.startswith("running_")):
                out[f"{name}.{t}"] = getattr(step_norm, t)[index]
    return out


def reference(learner: pymeta.MAMLpp, episode, weights: dict[int, float], first_order: bool = False):
    """``(meta-loss, BatchNorm inputs by (index, layer))`` by an explicit per-task loop of
    ``autograd.grad(create_graph=True)``: step i runs with BatchNorm index i, and so does
    the query forward after it; the meta-loss is the mean over tasks of the weighted query
    losses after the steps in ``weights``."""
    model = learner.module
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    per_step_weights = {f"{n}.{t}" for n in bn_names for t in ("weight", "bias")} if learner.step_norms else set()
    params = dict(model.named_parameters())
    adapted = [n for n in params if n not in per_step_weights]
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    index = 0
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: inputs.setdefault((index, n), []).append(args[0].detach())) for n in bn_names]
    sx, sy, qx, qy = episode
    meta = 0.0
    for t in range(sx.shape[0]):
        fast = {n: params[n] for n in adapted}
        for index in range(learner.steps):
            bn = step_tensors(learner, index)
            loss = F.cross_entropy(run(model, {**fast, **bn}, sx[t]), sy[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=not first_order)
            rates = learner.step_lrs[index] if learner.step_lrs is not None else [learner.lr] * len(adapted)
            fast = {n: fast[n] - rates[j] * g for j, (n, g) in enumerate(zip(adapted, grads, strict=True))}
            if index + 1 in weights:
                meta = meta + weights[index + 1] * F.cross_entropy(run(model, {**fast, **bn}, qx[t]), qy[t])
    for hook in hooks:
        hook.remove()
    return meta / sx.shape[0], inputs


def wrt(learner: nn.Module) -> list[torch.Tensor]:
    return [p for p in learner.parameters() if p.requires_grad]


def assert_grads_match(learner, loss, expected_loss, label: str) -> None:
    grads = torch.autograd.grad(loss, wrt(learner), allow_unused=True)
    expected = torch.autograd.grad(expected_loss, wrt(learner), allow_unused=True)
    # The model's own BatchNorm weights are replaced by the per-step ones: unused by both.
    assert [g is None for g in grads] == [e is None for e in expected]
    err = relative_error([g for g in grads if g is not None], [e for e in expected if e is not None])
    print(f"{label}: meta-loss {loss.item():.6f}, meta-gradient relative error {err:.3e}")
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    assert err < 1e-10


def test_importance_vector_is_the_reference_schedule():
    assert importance_vector(5, 0, 10) == pytest.approx([0.2] * 5)
    # each epoch moves 1/(5*10) from every earlier step to the last
    assert importance_vector(5, 3, 10) == pytest.approx([0.14] * 4 + [0.44])
    assert importance_vector(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92])
    # at least 0.03/5 for the earlier steps, the rest for the last
    assert importance_vector(5, 9, 5) == pytest.approx([0.006] * 4 + [0.976])
    assert sum(importance_vector(3, 4, 7)) == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_multi_step_meta_gradient_matches_per_task_reference(strategy, mode):
    learner = make(strategy, eval_mode=mode == "eval")
    episode = classification_episode()
    expected, _ = reference(learner, episode, dict(enumerate(importance_vector(2, 3, 10), start=1)))
    assert_grads_match(learner, learner.meta_loss(*episode), expected, f"{strategy} {mode}")


def test_last_step_loss_first_order_and_checkpointed_steps():
    """After the multi-step-loss epochs only the last step's loss counts; during the
    first-order epochs the inner gradients are constants; checkpointed steps agree."""
    episode = classification_episode()
    learner = make("vmap", steps=3, msl_epochs=2)
    expected, _ = reference(learner, episode, {3: 1.0})
    assert_grads_match(learner, learner.meta_loss(*episode), expected, "last step only")
    learner = make("lowered", steps=3, first_order_epochs=4)
    expected, _ = reference(learner, episode, dict(enumerate(importance_vector(3, 3, 10), start=1)), first_order=True)
    assert_grads_match(learner, learner.meta_loss(*episode), expected, "first order")
    learner = make("loop", steps=3, checkpoint_steps=True)
    expected, _ = reference(learner, episode, dict(enumerate(importance_vector(3, 3, 10), start=1)))
    assert_grads_match(learner, learner.meta_loss(*episode), expected, "checkpointed")


def test_chunked_meta_loss_and_episode():
    episode = classification_episode(tasks=5)
    plain = make("lowered")
    chunked = make("lowered")
    chunked.load_state_dict(plain.state_dict())
    loss = plain.meta_loss(*episode)
    grads = torch.autograd.grad(loss, wrt(plain), allow_unused=True)
    chunked_loss = chunked.meta_loss(*episode, task_chunk=2)
    chunked_loss.backward()
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-12, atol=0)
    for g, p in zip(grads, wrt(chunked), strict=True):  # chunks give unused weights zeros
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g, rtol=1e-10, atol=1e-14)
    # chunks update the statistics once, as the whole batch does
    for a, b in zip(plain.buffers(), chunked.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    sx, sy, qx, qy = episode
    pred = plain.episode(sx, sy, qx)
    expected, _ = reference(plain, episode, {2: 1.0})
    torch.testing.assert_close(per_task_sum(F.cross_entropy, pred, qy) / 5, expected, rtol=1e-12, atol=0)


def test_compiled_multi_step_loss_equals_eager():
    """``torch.compile(fullgraph=True)`` of the multi-step loss (lowered, train mode: the
    recorded statistics update buffers inside the graph); aot_eager keeps it fast."""
    torch._dynamo.reset()
    eager, compiled = make("lowered"), make("lowered")
    compiled.load_state_dict(eager.state_dict())
    episode = classification_episode()
    expected = torch.autograd.grad(eager.meta_loss(*episode), wrt(eager), allow_unused=True)
    loss = torch.compile(compiled.meta_loss, backend="aot_eager", fullgraph=True)(*episode)
    grads = torch.autograd.grad(loss, wrt(compiled), allow_unused=True)
    assert [g is None for g in grads] == [e is None for e in expected]
    err = relative_error([g for g in grads if g is not None], [e for e in expected if e is not None])
    print(f"compiled vs eager meta-gradient: relative error {err:.2e}")
    assert err < 1e-10
    for (name, a), b in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)
    torch._dynamo.reset()


def test_all_options_off_is_maml():
    episode = classification_episode()
    model = conv_bn().double()
    off = pymeta.MAMLpp(model, lr=0.3, steps=2, lslr=False, per_step_bn_stats=False, per_step_bn_weights=False,
                        msl_epochs=0, first_order_epochs=0, cosine_min_lr=None, strategy="vmap")
    assert list(off.parameters()) == list(model.parameters()) and not list(off.step_norms.parameters())
    grads = torch.autograd.grad(off.meta_loss(*episode), list(model.parameters()))
    expected = reference_meta_grads(model, episode, F.cross_entropy, 0.3, 2)
    err = relative_error(grads, [e / 3 for e in expected])  # the reference sums over the 3 tasks
    print(f"all options off vs MAML reference: {err:.3e}")
    assert err < 1e-10
    assert off.outer_lr_scheduler(torch.optim.Adam(off.parameters()), 10) is None


def test_per_step_running_statistics_are_mamlpps_own():
    """A training step updates each per-step running statistic once, from the batch
    statistics at that BatchNorm index averaged over tasks and forwards, with the
    layer's momentum; the model's buffers never change; no_grad and eval mode leave them."""
    learner = make("vmap")
    model_buffers = {n: b.clone() for n, b in learner.module.named_buffers()}
    before = {n: b.clone() for n, b in learner.step_norms.named_buffers()}
    episode = classification_episode()
    _, inputs = reference(learner, episode, {1: 0.5, 2: 0.5})
    learner.meta_loss(*episode).backward()
    for (index, name), xs in inputs.items():
        # per task and forward: unbiased per-channel statistics, as F.batch_norm's running update
        var, mean = zip(*(torch.var_mean(x, dim=(0, 2, 3)) for x in xs), strict=True)
        key = name.replace(".", "-")
        for stat, values in (("running_mean", mean), ("running_var", var)):
            want = 0.9 * before[f"{key}.{stat}"][index] + 0.1 * torch.stack(values).mean(0)
            torch.testing.assert_close(getattr(learner.step_norms[key], stat)[index], want, rtol=1e-12, atol=1e-14)
        assert learner.step_norms[key].num_batches_tracked[index] == 1
    for name, buffer in learner.module.named_buffers():
        assert torch.equal(buffer, model_buffers[name]), name
    after = {n: b.clone() for n, b in learner.step_norms.named_buffers()}
    with torch.no_grad():
        learner.meta_loss(*episode)
    learner.eval()
    learner.meta_loss(*episode)
    for name, buffer in learner.step_norms.named_buffers():
        assert torch.equal(buffer, after[name]), name


def test_momentum_none_is_a_cumulative_average():
    learner = make("lowered")
    for m in learner.module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    episode = classification_episode()
    _, inputs = reference(learner, episode, {2: 1.0})
    learner.episode(*episode[:3])
    (index, name), xs = next(iter(inputs.items()))
    mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(learner.step_norms[name.replace(".", "-")].running_mean[index], mean, rtol=1e-12,
                               atol=1e-14)  # the first update replaces the initial value


def test_state_dict_holds_per_step_tensors_and_the_epoch():
    learner = make("lowered", steps=3)
    learner.meta_loss(*classification_episode()).backward()
    other = pymeta.MAMLpp(conv_bn().double(), lr=0.3, steps=3)
    other.load_state_dict(learner.state_dict())
    assert other.epoch == 3 and other.step_lrs.shape == (3, 6)  # 2 convs and a linear layer, BatchNorm not
    for (name, a), b in zip(learner.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other.set_progress(1, 10)  # the epoch never goes back
    assert other.epoch == 3
    other.set_progress(8, 10)
    assert other.epoch == 70 and not other._msl and not other._annealed_first_order


def test_cosine_outer_learning_rate_and_inner_steps_limit():
    learner = make("lowered")
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    scheduler = learner.outer_lr_scheduler(opt, 4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    rates = []
    for _ in range(4):
        opt.step()
        scheduler.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[-1] == pytest.approx(1e-5) and rates == sorted(rates, reverse=True)
    learner.inner_steps = 0
    sx, sy, qx, _ = classification_episode()
    assert learner.episode(sx, sy, qx).shape == (3, 12, 4)
    with pytest.raises(ValueError, match="inner_steps must be <= 2: MAMLpp learned per-step rates and BatchNorm "
                                         "tensors for 2 steps, got 3"):
        learner.inner_steps = 3


class CustomNorm(nn.Module):
    """A hand-written batch norm with running statistics, which MAML++ cannot make per step."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x):
        return x - x.mean(dim=(0, 2, 3), keepdim=True)


class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("layer", [CustomNorm(4), OwnForward(4)])
def test_a_norm_layer_that_cannot_be_per_step_is_a_clear_error(layer):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), layer, nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=rf"model: MAMLpp makes BatchNorm layers per step, but '1' is a "
                                         rf"{type(layer).__name__}, which it cannot"):
        pymeta.MAMLpp(model, lr=0.1, steps=2)
    pymeta.MAMLpp(model, lr=0.1, steps=2, per_step_bn_stats=False, per_step_bn_weights=False)
    with pytest.raises(NotImplementedError, match=r"use pymeta\.MAML for learn2learn's API"):
        pymeta.MAMLpp(mlp(), lr=0.1, steps=2).clone()


# ------------------------------------------------------------------ pymeta train
# (sharded training, per-step statistics included: tests/test_distributed.py)
def glyphs_config(tmp_path, name: str, **overrides) -> training.TrainConfig:
    """A tiny glyphs run (BatchNorm, so per-step statistics are trained)."""
    settings = dict(algo="mamlpp", data="glyphs", ways=2, shots=1, queries=1, meta_batch=3, iterations=4,
                    inner_steps=2, val_every=2, val_episodes=2, eval_episodes=2, strategy="lowered",
                    out=str(tmp_path / f"{name}.pt"))
    return training.TrainConfig(**{**settings, **overrides})


class Interrupted(Exception):
    pass


def test_pymeta_train_mamlpp_resumes_exactly(tmp_path, monkeypatch):
    """An interrupted run resumed from its last checkpoint equals the uninterrupted one:
    per-step statistics and rates, epoch, optimizer and cosine schedule are all saved
    (4 steps, in epochs 0, 25, 50, 75: the multi-step loss at step 1, first order until step 2)."""
    # conv4 at 8 channels: the same layers as the default backbone, a fraction of the time
    monkeypatch.setattr(training.DataSpec, "backbone", lambda self: models.conv4(1, 2, hidden=8))
    full = training.train(glyphs_config(tmp_path, "full"), progress=False, log=lambda line: None)
    step = training.learner_step

    def crash_at_step_3(learner, batch, spec):
        if learner.epoch >= 50:
            raise Interrupted
        return step(learner, batch, spec)

    monkeypatch.setattr(training.loop, "learner_step", crash_at_step_3)  # where train() looks it up
    with pytest.raises(Interrupted):
        training.train(glyphs_config(tmp_path, "part"), progress=False, log=lambda line: None)
    monkeypatch.setattr(training.loop, "learner_step", step)
    resumed = training.train(glyphs_config(tmp_path, "part"), progress=False, log=lambda line: None,
                             resume=tmp_path / "part-last.pt")
    assert resumed.losses == full.losses[2:]
    a, b = checkpoint.load(tmp_path / "full-last.pt"), checkpoint.load(tmp_path / "part-last.pt")
    assert a["model"]["_extra_state"] == 75  # the epoch of step 4 of 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["last_epoch"] == 4
    assert b["model"]["step_norms.block1-1.num_batches_tracked"].tolist() == [4, 4]
    assert a["optimizer"]["param_groups"][0]["lr"] < 1e-3


def test_pymeta_train_mamlpp_on_sinusoid(tmp_path, capsys):
    """No BatchNorm: nothing per step but the rates; the command's defaults (5 steps)."""
    argv = ["train", "--algo", "mamlpp", "--data", "sinusoid", "--iterations", "2", "--meta-batch", "3",
            "--val-every", "2", "--val-episodes", "2", "--eval-episodes", "2", "--no-progress",
            "--out", str(tmp_path / "s.pt")]
    assert cli.main(argv) == 0
    assert "test MSE after adaptation (10-shot, 5 steps)" in capsys.readouterr().out
    model = checkpoint.load(tmp_path / "s-last.pt")["model"]
    assert model["step_lrs"].shape == (5, 6) and not any(n.startswith("step_norms") for n in model)
    assert cli.main([*argv, "--eval-inner-steps", "6"]) == 2
    assert "eval_inner_steps must be <= inner_steps = 5 for mamlpp" in capsys.readouterr().err
