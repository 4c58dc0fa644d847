"""MAML++ vs MAML: time per meta-step on conv4, Glyphs 5-way 1-shot (``pymeta train``'s setting).

One meta-step = the outer loss of a batch of episodes and its ``backward()`` (the optimizer
step is the same for both and left out). Variants, all ``strategy="lowered"`` unless
``--strategy`` says otherwise, on the same episodes:

* ``maml 1 step``: ``pymeta train --algo maml``'s default (1 inner step, second order);
* ``maml 5 steps``: MAML at MAML++'s step count;
* ``mamlpp 5 steps, epoch 0``: the start of a run: multi-step loss, first order;
* ``mamlpp 5 steps, late``: after the annealing (epoch >= 50): last-step loss, second
  order -- the like-for-like comparison with ``maml 5 steps``;
* ``mamlpp 5 steps, msl + 2nd order``: multi-step loss at second order (``first_order_epochs=0``).

Prints medians of interleaved ``blocked_autorange`` rounds and each variant's time
relative to ``maml 5 steps``; writes ``benchmarks/results/mamlpp.csv``.

    python benchmarks/bench_mamlpp.py [--meta-batch 4] [--queries 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from measure import write_csv
from torch.utils.benchmark import Timer

import pymeta
from pymeta.data import Glyphs, TaskSampler
from pymeta.models import conv4


def meta_step(learner: pymeta.MAML, episode: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def step() -> None:
        learner.zero_grad(set_to_none=True)
        learner.outer_loss(*episode, F.cross_entropy).backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--strategy", default="lowered")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    args = ap.parse_args()

    episode = tuple(next(iter(TaskSampler(Glyphs("train"), 5, 1, args.queries, args.meta_batch, seed=0))))
    torch.manual_seed(0)
    init = conv4(1, 5).state_dict()

    def model() -> torch.nn.Module:
        net = conv4(1, 5)
        net.load_state_dict(init)
        return net

    def mamlpp(epoch: int, **options) -> pymeta.MAMLpp:
        learner = pymeta.MAMLpp(model(), lr=0.1, steps=5, strategy=args.strategy, **options)
        learner.set_epoch(epoch)
        return learner

    variants = {
        "maml 1 step": pymeta.MAML(model(), lr=0.4, steps=1, strategy=args.strategy),
        "maml 5 steps": pymeta.MAML(model(), lr=0.1, steps=5, strategy=args.strategy),
        "mamlpp 5 steps, epoch 0": mamlpp(0),
        "mamlpp 5 steps, late": mamlpp(60),
        "mamlpp 5 steps, msl + 2nd order": mamlpp(0, first_order_epochs=0),
    }
    steps = {name: meta_step(learner, episode) for name, learner in variants.items()}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved: machine noise hits all alike
        for name, step in steps.items():
            times[name].append(Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=1.0).median)
    base = statistics.median(times["maml 5 steps"])
    rows = [{"variant": name, "ms_per_meta_step": 1e3 * statistics.median(t),
             "relative_to_maml_5_steps": statistics.median(t) / base} for name, t in times.items()]
    write_csv("mamlpp.csv", rows)
    print(f"\nconv4, Glyphs 5-way 1-shot, {args.queries} queries/class, {args.meta_batch} tasks, "
          f"strategy={args.strategy}, {torch.get_num_threads()} threads, medians of {args.repeats} rounds")
    for row in rows:
        print(f"{row['variant']:34s} {row['ms_per_meta_step']:9.1f} ms  {row['relative_to_maml_5_steps']:5.2f}x")


if __name__ == "__main__":
    main()
