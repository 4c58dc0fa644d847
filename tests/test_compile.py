"""``torch.compile`` of a meta-step: one graph, eager-equal meta-gradients, no recompiles.

The traced inner loop takes its gradients with ``torch.func.grad`` (AOTAutograd cannot
trace the double backward of ``autograd.grad(create_graph=True)``), so the whole
meta-step is one graph that AOTAutograd differentiates once. Most tests compile with
the ``aot_eager`` backend: it runs Dynamo and AOTAutograd -- where graph breaks and the
double-backward limitation live -- without the C++ code generation of inductor, which
one test exercises on the sinusoid workload.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_episode, conv_bn, mlp, regression_episode
from torch._dynamo.testing import CompileCounterWithBackend

import pymeta
from pymeta import models


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def query_loss(learner):
    def step(sx, sy, qx, qy):
        return F.cross_entropy(learner.episode(sx, sy, qx).flatten(0, 1), qy.flatten())

    return step


def learners():
    """``name -> (learner, fullgraph)`` on the BatchNorm conv net, float64."""
    full = conv_bn().double()
    return {
        "maml-lowered": (pymeta.MAML(conv_bn().double(), lr=0.3, steps=2, strategy="lowered"), True),
        "maml-eval-lowered": (pymeta.MAML(conv_bn().double().eval(), lr=0.3, steps=2, strategy="lowered"), True),
        "maml-vmap": (pymeta.MAML(conv_bn().double(), lr=0.3, strategy="vmap"), True),
        "maml-loop": (pymeta.MAML(conv_bn().double(), lr=0.3, strategy="loop"), True),
        "fomaml": (pymeta.MAML(conv_bn().double(), lr=0.3, first_order=True, strategy="lowered"), True),
        "metasgd": (pymeta.MetaSGD(conv_bn().double(), lr=0.3, strategy="lowered"), True),
        "anil": (pymeta.ANIL(full[:-1], full[-1], lr=0.3, steps=2, strategy="lowered"), True),
        "protonet": (pymeta.ProtoNet(conv_bn().double()[:-1], strategy="lowered", n_way=4), True),
        # Without n_way the number of classes is read from the labels: a graph break.
        "protonet-infer-n_way": (pymeta.ProtoNet(conv_bn().double()[:-1], strategy="lowered"), False),
        "finetune": (pymeta.FineTune(conv_bn().double()[:-1], n_way=4, lr=0.5, steps=3, base_classes=6,
                                     feature_dim=16, strategy="lowered", finetune_encoder=True), True),
    }


@pytest.mark.parametrize("name", list(learners()))
def test_compiled_meta_gradients_equal_eager(name):
    learner, fullgraph = learners()[name]
    params = [p for p in learner.parameters() if p.requires_grad]
    step = query_loss(learner)
    episode = classification_episode()
    eager = step(*episode)
    expected = torch.autograd.grad(eager, params, allow_unused=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=fullgraph)
    loss = compiled(*episode)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # Relative to the whole meta-gradient: a conv bias before train-mode BatchNorm has a
    # gradient of exactly 0 in exact arithmetic, so its own norm is rounding noise (1e-17)
    # that differs between eager's fused BatchNorm kernel and the compiler's three ops.
    scale = torch.cat([e.flatten() for e in expected if e is not None]).norm()
    for p, g, e in zip(params, grads, expected, strict=True):
        if e is None:
            assert g is None
            continue
        err = ((g - e).norm() / scale).item()
        print(f"{name} {tuple(p.shape)}: relative error {err:.2e}")
        assert err < 1e-10
    torch.testing.assert_close(loss, eager, rtol=1e-12, atol=1e-12)


def test_reptile_outer_grad_compiles():
    model = conv_bn().double()
    reptile = pymeta.Reptile(model, lr=0.1, steps=2, strategy="lowered")
    sx, sy, _, _ = classification_episode()
    reptile.outer_grad(sx, sy)
    expected = [p.grad.clone() for p in model.parameters()]
    reptile.zero_grad()
    torch.compile(reptile.outer_grad, backend="aot_eager", fullgraph=True)(sx, sy)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_no_recompile_across_meta_batches_of_the_same_shapes():
    maml = pymeta.MAML(mlp().double(), lr=0.05, steps=2, strategy="auto")
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda sx, sy, qx, qy: F.mse_loss(maml.episode(sx, sy, qx), qy), backend=counter)
    for seed in range(3):
        torch.manual_seed(seed)
        step(*regression_episode()).backward()
    assert counter.frame_count == 1
    assert maml.strategy is None  # "auto" timed nothing inside the graph: it runs its first candidate


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_task_chunk_compiles_as_one_graph_equal_to_eager(algo):
    """``meta_loss(task_chunk=1)`` (an eager memory option: autograd.grad per chunk inside
    the forward) compiles as one graph over all tasks: fullgraph, no recompile across
    meta-batches with "auto" (a graph break let the picker time eagerly and recompile the
    step once it chose), and the eager chunked meta-gradient."""
    if algo == "maml":
        learner = pymeta.MAML(conv_bn().double(), lr=0.3, steps=2, strategy="auto", task_chunk=1)
    else:
        learner = pymeta.ProtoNet(conv_bn().double()[:-1], strategy="auto", n_way=4, task_chunk=1)
    params = [p for p in learner.parameters() if p.requires_grad]
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda *ep: learner.outer_loss(*ep, F.cross_entropy), backend=counter, fullgraph=True)
    episodes = []
    for seed in range(3):
        torch.manual_seed(seed)
        episodes.append(classification_episode())
    compiled = [torch.autograd.grad(step(*episode), params) for episode in episodes]
    assert counter.frame_count == 1
    for episode, grads in zip(episodes, compiled, strict=True):  # eager after: "auto" then times eagerly
        expected = torch.autograd.grad(learner.outer_loss(*episode, F.cross_entropy), params)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_undecided_auto_traces_the_graph_of_its_first_candidate():
    """Under torch.compile an "auto" learner that has not chosen runs its first candidate
    ("lowered" here), and its query losses as that strategy computes them: one batched
    call, not one per task ("loop", which turned a 32-task conv4 graph into 32 loss
    computations and took its cold compile from 44 to 76 s)."""
    def graph_of(strategy):
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        learner = pymeta.MAML(conv_bn().double(), lr=0.3, strategy=strategy, task_chunk=1)
        torch._dynamo.reset()
        torch.compile(lambda *ep: learner.outer_loss(*ep, F.cross_entropy), backend=keep, fullgraph=True)(
            *classification_episode())
        (graph,) = graphs
        return [node.target for node in graph.graph.nodes if node.op == "call_function"]

    auto, lowered = graph_of("auto"), graph_of("lowered")
    assert auto.count(F.cross_entropy) == lowered.count(F.cross_entropy)
    assert auto == lowered


def test_label_checks_hold_inside_the_graph():
    maml = pymeta.MAML(conv_bn().double(), lr=0.3, strategy="lowered")
    step = torch.compile(query_loss(maml), backend="aot_eager", fullgraph=True)
    sx, sy, qx, qy = classification_episode()
    step(sx, sy, qx, qy)
    bad = sy.clone()
    bad[1, 2] = 7
    with pytest.raises(RuntimeError, match=r"support_y must hold class labels in \[0, 4\) for a model with 4 outputs"):
        step(sx, bad, qx, qy)


def test_check_finite_holds_inside_the_graph():
    maml = pymeta.MAML(mlp().double(), lr=0.05, strategy="lowered", check_finite=True)
    step = torch.compile(lambda sx, sy, qx, qy: F.mse_loss(maml.episode(sx, sy, qx), qy), backend="aot_eager",
                         fullgraph=True)
    sx, sy, qx, qy = regression_episode()
    step(sx, sy, qx, qy)
    sy[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="inner loop: step 0 has a non-finite loss or gradient"):
        step(sx, sy, qx, qy)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inductor_meta_step_equals_eager(dtype):
    """The real backend (C++ code generation) on the sinusoid MLP, second order."""
    model = models.mlp(1, (40, 40), 1).to(dtype)
    maml = pymeta.MAML(model, lr=0.01, steps=2, loss_fn=F.mse_loss, strategy="lowered")
    sx, sy, qx, qy = (t.to(dtype) for t in regression_episode(tasks=5, shots=10, queries=10))

    def step(sx, sy, qx, qy):
        return F.mse_loss(maml.episode(sx, sy, qx), qy)

    expected = torch.autograd.grad(step(sx, sy, qx, qy), list(model.parameters()))
    grads = torch.autograd.grad(torch.compile(step, fullgraph=True)(sx, sy, qx, qy), list(model.parameters()))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for g, e in zip(grads, expected, strict=True):
        err = ((g - e).norm() / e.norm()).item()
        print(f"{dtype} {tuple(e.shape)}: relative error {err:.2e}")
        assert err < tol


def train_sinusoid(out, compile):
    """A short ``pymeta train --algo maml --data sinusoid`` run (``--compile`` if asked)."""
    from pymeta import training

    config = training.TrainConfig(algo="maml", data="sinusoid", iterations=6, meta_batch=3, val_every=6,
                                  val_episodes=3, eval_episodes=3, strategy="lowered", compile=compile, out=str(out))
    return training.train(config, progress=False, log=lambda line: None)


def test_pymeta_train_compile_trains_like_eager(tmp_path, monkeypatch):
    """``pymeta train --compile`` (backend aot_eager here; inductor is exercised above)."""
    from pymeta import training

    eager = train_sinusoid(tmp_path / "eager.pt", False)
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    compiled = train_sinusoid(tmp_path / "compiled.pt", True)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    with pytest.raises(ValueError, match="cuda_graph and compile exclude each other"):
        training.TrainConfig(algo="maml", device="cuda", cuda_graph=True, compile=True)._check_cuda_graph()


def test_pymeta_train_compile_falls_back_to_eager_with_one_warning_when_compiling_fails(tmp_path, monkeypatch):
    """A backend that cannot compile the model: one warning naming the reason, and the
    run trains eagerly from that step on, with the eager run's losses."""

    def failing_backend(graph, example_inputs):
        raise NotImplementedError("this backend compiles nothing")

    eager = train_sinusoid(tmp_path / "eager.pt", False)
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend=failing_backend))
    with pytest.warns(UserWarning, match=r"MAML cannot be compiled \(BackendCompilerFailed: .*this backend "
                                         r"compiles nothing.*training eagerly") as caught:
        fallen_back = train_sinusoid(tmp_path / "fallen-back.pt", True)
    assert sum("cannot be compiled" in str(w.message) for w in caught) == 1
    assert fallen_back.losses == eager.losses


def test_compiled_step_names_graph_breaks_besides_backward(monkeypatch):
    """ProtoNet without ``n_way`` reads the class count from the labels: a graph break,
    correct but slower, named once on the first step (and never the one at backward())."""
    from types import SimpleNamespace

    from pymeta.training.steps import CompiledStep

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    learner = pymeta.ProtoNet(conv_bn().double()[:-1], strategy="lowered")
    episode = classification_episode(tasks=2)
    step, spec = CompiledStep(), SimpleNamespace(loss_fn=F.cross_entropy)
    with pytest.warns(UserWarning, match=r"compiled with \d+ graph break.* besides backward\(\), e.g. .Unsupported Tensor.item\(\)") as caught:
        step(learner, episode, spec)
    assert len(caught) == 1
    compiled_grads = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad()
    learner.train_step(episode, F.cross_entropy)
    for compiled, eager in zip(compiled_grads, [p.grad for p in learner.parameters()], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
