"""Property-based input checks: random shapes and bad values for every public entry point.

The contract: valid input gives the right answer (checked against a direct computation
or against running each task alone); invalid input raises only ``ValueError`` or
``TypeError`` whose message names the offending argument -- never another exception,
a hang, or a silently wrong result.
"""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pymeta
from pymeta import ops
from pymeta.data import Sinusoid, TaskSampler

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEATURES, WAYS = 3, 3


@contextlib.contextmanager
def rejects(*names: str):
    """Expect a ValueError/TypeError whose message names one of ``names``."""
    with pytest.raises((ValueError, TypeError)) as info:
        yield
    message = str(info.value)
    assert any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", message) for n in names), f"{names} not in: {message}"


# ------------------------------------------------------------------ episodes
def learner(algo: str) -> nn.Module:
    torch.manual_seed(0)
    if algo == "maml":
        return pymeta.MAML(nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, WAYS)), lr=0.5, steps=2,
                           loss_fn=F.cross_entropy, strategy="vmap")
    if algo == "maml-regression":
        return pymeta.MAML(nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 1)), lr=0.1, steps=2,
                           loss_fn=F.mse_loss, strategy="loop")
    if algo == "metasgd":
        return pymeta.MetaSGD(nn.Linear(FEATURES, WAYS), lr=0.3, loss_fn=F.cross_entropy, strategy="vmap")
    if algo == "anil":
        return pymeta.ANIL(nn.Sequential(nn.Linear(FEATURES, 6), nn.ReLU()), nn.Linear(6, WAYS), lr=0.5, steps=2,
                           loss_fn=F.cross_entropy)
    if algo == "reptile":
        return pymeta.Reptile(nn.Linear(FEATURES, 1), lr=0.1, steps=2, loss_fn=F.mse_loss)
    if algo == "protonet":
        return pymeta.ProtoNet(nn.Sequential(nn.Linear(FEATURES, 6), nn.ReLU(), nn.Linear(6, 4)))
    return pymeta.FineTune(nn.Linear(FEATURES, 6), WAYS, lr=0.5, steps=3, base_classes=4, feature_dim=6)


REGRESSION = ("maml-regression", "reptile")
NEEDS_EVERY_CLASS = ("protonet", "finetune")
COMMON = ("valid", "x_int", "qx_int", "qx_list", "tasks", "support_len", "example_shape", "flat_support",
          "dtype_mix", "model_dtype", "no_tasks", "no_support")
CLASSIFICATION = ("y_float", "label_high", "label_negative", "y_3d")
REGRESSION_ONLY = ("y_shape",)
EXPECTED = {  # the arguments the error may name
    # flat_support: [S, D] reads as T = S tasks of D scalar examples, a valid layout for a
    # model of scalar inputs; it is then the targets that do not fit the predictions.
    "x_int": ("support_x",), "qx_int": ("query_x",), "qx_list": ("query_x",), "tasks": ("support_x", "query_x"),
    "support_len": ("support_y",), "example_shape": ("support_x", "query_x"), "flat_support": ("support_x", "query_x", "support_y"),
    "dtype_mix": ("query_x",), "model_dtype": ("support_x",), "no_tasks": ("support_x",), "no_support": ("support_x",),
    "y_float": ("support_y",), "label_high": ("support_y",), "label_negative": ("support_y",), "y_3d": ("support_y",),
    "y_shape": ("support_y",), "missing_class": ("support_y",),
}


@st.composite
def episodes(draw, algo: str):
    """``(support_x, support_y, query_x, mutation)``, valid unless ``mutation != "valid"``."""
    mutations = COMMON + (REGRESSION_ONLY if algo in REGRESSION else CLASSIFICATION)
    if algo in NEEDS_EVERY_CLASS:
        mutations += ("missing_class",)
    mutation = draw(st.sampled_from(mutations))
    tasks = draw(st.integers(1, 4))
    per_class = draw(st.integers(1, 2))
    support, queries = WAYS * per_class, draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    sx = torch.randn(tasks, support, FEATURES, generator=g)
    qx = torch.randn(tasks, queries, FEATURES, generator=g)
    if algo in REGRESSION:
        sy = torch.randn(tasks, support, 1, generator=g)
    else:  # every class per task, in a random order
        sy = torch.stack([torch.arange(WAYS).repeat(per_class)[torch.randperm(support, generator=g)]
                          for _ in range(tasks)])
    t, s = draw(st.integers(0, tasks - 1)), draw(st.integers(0, support - 1))
    if mutation == "x_int":
        sx = sx.long()
    elif mutation == "qx_int":
        qx = qx.to(torch.int32)
    elif mutation == "qx_list":
        qx = qx.tolist()
    elif mutation == "tasks":
        qx = torch.randn(tasks + 1, queries, FEATURES)
    elif mutation == "support_len":
        sy = torch.cat([sy, sy[:, :1]], 1)
    elif mutation == "example_shape":
        qx = torch.randn(tasks, queries, FEATURES + 1)
    elif mutation == "flat_support":
        sx = sx[0]
    elif mutation == "dtype_mix":
        qx = qx.double()
    elif mutation == "model_dtype":
        sx, qx = sx.double(), qx.double()
        sy = sy.double() if sy.is_floating_point() else sy
    elif mutation == "no_tasks":
        sx, sy, qx = sx[:0], sy[:0], qx[:0]
    elif mutation == "no_support":
        sx, sy = sx[:, :0], sy[:, :0]
    elif mutation == "y_float":
        sy = sy.float()
    elif mutation == "label_high":
        sy = sy.clone()
        # Above WAYS, not at it: ProtoNet infers N from the largest label, and a label of
        # exactly WAYS can then make a valid (WAYS + 1)-way episode; with a gap, class WAYS
        # has no example, an error for every learner.
        sy[t, s] = WAYS + 1 + draw(st.integers(0, 2))
    elif mutation == "label_negative":
        sy = sy.clone()
        sy[t, s] = -draw(st.integers(1, 3))
    elif mutation == "y_3d":
        sy = sy.unsqueeze(-1)
    elif mutation == "y_shape":
        sy = torch.randn(tasks, support, draw(st.sampled_from([2, 3])))
    elif mutation == "missing_class":  # not the highest class: ProtoNet infers N from it
        c = draw(st.integers(0, WAYS - 2))
        sy = sy.clone()
        sy[t][sy[t] == c] = c + 1
    return sx, sy, qx, mutation


def run(model: nn.Module, sx, sy, qx) -> torch.Tensor:
    if isinstance(model, pymeta.Reptile):
        model.outer_grad(sx, sy)  # its training entry point; its episode is MAML's
    return model.episode(sx, sy, qx)


@pytest.mark.parametrize("algo", ["maml", "maml-regression", "metasgd", "anil", "reptile", "protonet", "finetune"])
@SETTINGS
@given(data=st.data())
def test_episode_validates_every_input(algo, data):
    sx, sy, qx, mutation = data.draw(episodes(algo))
    model = learner(algo)
    if mutation != "valid":
        with rejects(*EXPECTED[mutation]):
            run(model, sx, sy, qx)
        return
    pred = run(model, sx, sy, qx)
    out = 1 if algo in REGRESSION else WAYS
    assert pred.shape == (sx.shape[0], qx.shape[1], out) and pred.isfinite().all()
    # Each task's answer depends on that task alone: running it by itself gives the same.
    t = data.draw(st.integers(0, sx.shape[0] - 1))
    alone = model.episode(sx[t : t + 1], sy[t : t + 1], qx[t : t + 1])[0]
    torch.testing.assert_close(alone, pred[t], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ samplers
BAD_COUNTS = st.sampled_from([0, -1, True, 1.5, "3", None])


class Labelled:
    """``classes`` classes of ``size`` examples; x encodes (class, index) so a test can check it."""

    def __init__(self, classes: int, size: int) -> None:
        self.items = [(torch.tensor([float(c), float(i)]), c) for c in range(classes) for i in range(size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


@SETTINGS
@given(classes=st.integers(1, 6), size=st.integers(1, 6), data=st.data())
def test_task_sampler_validates_and_samples_correctly(classes, size, data):
    args = {name: data.draw(st.integers(1, 4)) for name in ("n_way", "k_shot", "q_queries", "meta_batch")}
    bad = data.draw(st.sampled_from([None, "n_way", "k_shot", "q_queries", "meta_batch", "seed"]))
    seed = data.draw(st.integers(0, 2**40))
    if bad == "seed":
        seed = data.draw(st.sampled_from([-1, 1.5, "0"]))
    elif bad is not None:
        args[bad] = data.draw(BAD_COUNTS)
    dataset = Labelled(classes, size)
    too_big = args["n_way"] > classes if bad is None else False
    too_small = bad is None and not too_big and args["k_shot"] + args["q_queries"] > size
    if bad is not None or too_big or too_small:
        names = (bad,) if bad else ("n_way",) if too_big else ("k_shot",)
        with rejects(*names):
            TaskSampler(dataset, **args, seed=seed)
        return
    sampler = TaskSampler(dataset, **args, seed=seed)
    n, k, q, tasks = args["n_way"], args["k_shot"], args["q_queries"], args["meta_batch"]
    ep = sampler.sample()
    assert ep.support_x.shape == (tasks, n * k, 2) and ep.query_x.shape == (tasks, n * q, 2)
    assert torch.equal(ep.support_y, torch.arange(n).repeat_interleave(k).expand(tasks, -1))
    assert torch.equal(ep.query_y, torch.arange(n).repeat_interleave(q).expand(tasks, -1))
    for t in range(tasks):
        xs = torch.cat([ep.support_x[t], ep.query_x[t]])
        ys = torch.cat([ep.support_y[t], ep.query_y[t]])
        # One dataset class per label, distinct classes, no example used twice in a task.
        class_of = {int(y): int(x[0]) for x, y in zip(xs, ys, strict=True)}
        assert all(class_of[int(y)] == int(x[0]) for x, y in zip(xs, ys, strict=True))
        assert len(set(class_of.values())) == n
        assert len({(float(x[0]), float(x[1])) for x in xs}) == len(xs)
    assert torch.equal(sampler.episode_at(0).support_x, ep.support_x)


INTERVALS = st.one_of(
    st.tuples(st.floats(-10, 10), st.floats(-10, 10)),
    st.sampled_from([(1.0, math.nan), (math.inf, 1.0), (1.0,), (1.0, 2.0, 3.0), ("a", "b"), 3.0, None, (True, 2.0)]),
)


@SETTINGS
@given(amplitude=INTERVALS, phase=INTERVALS, x_range=INTERVALS, data=st.data())
def test_sinusoid_validates_and_samples_correctly(amplitude, phase, x_range, data):
    counts = {name: data.draw(st.integers(1, 5)) for name in ("k_shot", "q_queries", "meta_batch")}
    bad = data.draw(st.sampled_from([None, None, "k_shot", "q_queries", "meta_batch"]))
    if bad:
        counts[bad] = data.draw(BAD_COUNTS)

    def check(name, value, strict=False):
        ok = (isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(v, float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and (value[0] < value[1] if strict else value[0] <= value[1]))
        return None if ok else name

    problems = [bad, check("amplitude", amplitude), check("phase", phase), check("x_range", x_range, strict=True)]
    problems = [p for p in problems if p]
    if problems:
        with rejects(*problems):
            Sinusoid(**counts, amplitude=amplitude, phase=phase, x_range=x_range, seed=0)
        return
    ep, tasks = Sinusoid(**counts, amplitude=amplitude, phase=phase, x_range=x_range, seed=0).sample_with_tasks()
    t, k, q = counts["meta_batch"], counts["k_shot"], counts["q_queries"]
    assert ep.support_x.shape == ep.support_y.shape == (t, k, 1) and ep.query_x.shape == (t, q, 1)
    assert ((ep.support_x >= x_range[0]) & (ep.support_x <= x_range[1])).all()
    assert ((tasks.amplitude >= amplitude[0] - 1e-6) & (tasks.amplitude <= amplitude[1] + 1e-6)).all()
    torch.testing.assert_close(ep.query_y, tasks(ep.query_x))


# ------------------------------------------------------------------ ops (reference backend)
@st.composite
def shapes(draw, tasks: int):
    return (tasks, *draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))


@SETTINGS
@given(data=st.data())
def test_inner_sgd_validates_and_computes(data):
    tasks = data.draw(st.integers(1, 3))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    params = [torch.randn(s, dtype=dtype) for s in data.draw(st.lists(shapes(tasks), min_size=1, max_size=3))]
    grads = [torch.randn_like(p) for p in params]
    kind = data.draw(st.sampled_from(["float", "scalar", "per_task", "per_element", "per_task_element"]))
    lr = {
        "float": 0.3,
        "scalar": torch.tensor(0.3, dtype=dtype),
        "per_task": torch.rand(tasks, dtype=dtype),
        "per_element": [torch.rand(p.shape[1:], dtype=dtype) for p in params],
        "per_task_element": [torch.rand(p.shape, dtype=dtype) for p in params],
    }[kind]
    k = data.draw(st.integers(0, len(params) - 1))
    mutation = data.draw(st.sampled_from(
        ["valid", "valid", "grad_shape", "grad_dtype", "param_int", "lengths", "params_tensor", "lr_str", "lr_shape"]
    ))
    expected = ("params", "grads")
    if mutation == "grad_shape":
        grads[k] = torch.randn(*grads[k].shape, 2, dtype=dtype)
        expected = (f"grads[{k}]",)
    elif mutation == "grad_dtype":
        grads[k] = grads[k].to(torch.float16)
        expected = (f"grads[{k}]",)
    elif mutation == "param_int":
        params[k] = params[k].long()
        expected = (f"params[{k}]",)
    elif mutation == "lengths":
        grads = grads[:-1]
    elif mutation == "params_tensor":
        params = params[0]
        expected = ("params",)
    elif mutation == "lr_str":
        lr = "0.1"
        expected = ("lr",)
    elif mutation == "lr_shape":
        lr = torch.rand(tasks + 1, 2, dtype=dtype)
        expected = ("lr",)
    with ops.force_backend("reference"):
        if mutation != "valid":
            with rejects(*expected):
                ops.inner_sgd(params, grads, lr)
            return
        out = ops.inner_sgd(params, grads, lr)
    for i, (p, g, o) in enumerate(zip(params, grads, out, strict=True)):
        rate = lr[i] if isinstance(lr, list) else lr.view(-1, *(1,) * (p.dim() - 1)) if kind == "per_task" else lr
        torch.testing.assert_close(o, p - rate * g)


@SETTINGS
@given(data=st.data())
def test_prototypes_validates_and_computes(data):
    tasks, n_way, per_class, dim = (data.draw(st.integers(1, 4)) for _ in range(4))
    support = torch.randn(tasks, n_way * per_class, dim, dtype=torch.float64)
    labels = torch.stack([torch.randperm(n_way * per_class) % n_way for _ in range(tasks)])
    mutation = data.draw(st.sampled_from(
        ["valid", "valid", "label_high", "label_negative", "missing", "labels_float", "support_int", "tasks",
         "support_2d", "n_way_zero", "n_way_bool", "labels_3d"]
    ))
    n = n_way
    t = data.draw(st.integers(0, tasks - 1))
    expected = {"label_high": "labels", "label_negative": "labels", "missing": "labels", "labels_float": "labels",
                "support_int": "support", "tasks": "support", "support_2d": "support", "n_way_zero": "n_way",
                "n_way_bool": "n_way", "labels_3d": "labels"}.get(mutation)
    if mutation == "label_high":
        labels[t, 0] = n_way
    elif mutation == "label_negative":
        labels[t, 0] = -1
    elif mutation == "missing":
        n = n_way + 1  # class n_way has no example
    elif mutation == "labels_float":
        labels = labels.double()
    elif mutation == "support_int":
        support = support.long()
    elif mutation == "tasks":
        support = support[:-1] if tasks > 1 else torch.cat([support, support])
    elif mutation == "support_2d":
        support = support[0]
    elif mutation == "n_way_zero":
        n = 0
    elif mutation == "n_way_bool":
        n = True
    elif mutation == "labels_3d":
        labels = labels.unsqueeze(-1)
    with ops.force_backend("reference"):
        if expected:
            with rejects(expected):
                ops.prototypes(support, labels, n)
            return
        protos = ops.prototypes(support, labels, n)
    for t in range(tasks):
        for c in range(n_way):
            torch.testing.assert_close(protos[t, c], support[t][labels[t] == c].mean(0))


@SETTINGS
@given(data=st.data())
def test_proto_logits_validates_and_computes(data):
    tasks, queries, n_way, dim = data.draw(st.integers(1, 3)), *(data.draw(st.integers(1, 5)) for _ in range(3))
    query = torch.randn(tasks, queries, dim, dtype=torch.float64)
    protos = torch.randn(tasks, n_way, dim, dtype=torch.float64)
    metric = data.draw(st.sampled_from(["sqeuclidean", "euclidean", "cosine"]))
    mutation = data.draw(st.sampled_from(
        ["valid", "valid", "dim", "tasks", "metric", "query_int", "protos_2d", "protos_list"]
    ))
    expected = {"dim": "protos", "tasks": "protos", "metric": "metric", "query_int": "query",
                "protos_2d": "protos", "protos_list": "protos"}.get(mutation)
    if mutation == "dim":
        protos = torch.randn(tasks, n_way, dim + 1, dtype=torch.float64)
    elif mutation == "tasks":
        protos = torch.randn(tasks + 1, n_way, dim, dtype=torch.float64)
    elif mutation == "metric":
        metric = data.draw(st.sampled_from(["cos", "", "L2", None]))
    elif mutation == "query_int":
        query = query.long()
    elif mutation == "protos_2d":
        protos = protos[0]
    elif mutation == "protos_list":
        protos = protos.tolist()
    with ops.force_backend("reference"):
        if expected:
            with rejects(expected):
                ops.proto_logits(query, protos, metric)
            return
        logits = ops.proto_logits(query, protos, metric)
    if metric == "cosine":
        reference = F.cosine_similarity(query.unsqueeze(2), protos.unsqueeze(1), dim=-1, eps=1e-8)
    else:
        dist = torch.cdist(query, protos)
        reference = -(dist.square() if metric == "sqeuclidean" else dist)
    torch.testing.assert_close(logits, reference, rtol=1e-7, atol=1e-7)
