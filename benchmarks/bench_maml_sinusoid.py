"""Second-order MAML on sinusoid: pymeta's batched ``episode`` vs a per-task loop.

Workload (the MAML paper's): MLP 1-40-40-1, 25 tasks, 10 shots, 10 queries, 1 inner
step, second order. Both variants compute the same meta-gradient (checked here before
timing); the loop is the textbook ``autograd.grad(create_graph=True)`` per task.

Prints tasks/second (median of interleaved ``blocked_autorange`` runs) and dispatched
ATen ops per meta-step, writes ``benchmarks/results/maml_sinusoid.csv``.

    python benchmarks/bench_maml_sinusoid.py [--tasks 25] [--steps 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from measure import count_aten_ops, print_table, write_csv
from torch.func import functional_call
from torch.utils.benchmark import Timer

import pymeta
from pymeta.models import mlp


def per_task_loop(model, sx, sy, qx, qy, lr: float, steps: int) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    meta_loss = 0.0
    for t in range(sx.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            loss = F.mse_loss(functional_call(model, fast, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        meta_loss = meta_loss + F.mse_loss(functional_call(model, fast, (qx[t],)), qy[t])
    return list(torch.autograd.grad(meta_loss / sx.shape[0], list(params.values())))


def batched(maml, sx, sy, qx, qy) -> list[torch.Tensor]:
    pred = maml.episode(sx, sy, qx)
    loss = F.mse_loss(pred, qy, reduction="none").flatten(1).mean(1).mean()
    return list(torch.autograd.grad(loss, list(maml.parameters())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=25)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = mlp(1, (40, 40), 1)
    maml = pymeta.MAML(model, lr=0.01, steps=args.steps, loss_fn=F.mse_loss, strategy="vmap")
    T, K = args.tasks, args.shots
    sx, qx = torch.rand(T, K, 1) * 10 - 5, torch.rand(T, K, 1) * 10 - 5
    amp, phase = torch.rand(T, 1, 1) * 4.9 + 0.1, torch.rand(T, 1, 1) * torch.pi
    sy, qy = amp * torch.sin(sx - phase), amp * torch.sin(qx - phase)

    variants = {
        "per-task loop": lambda: per_task_loop(model, sx, sy, qx, qy, 0.01, args.steps),
        "pymeta episode": lambda: batched(maml, sx, sy, qx, qy),
    }
    ref, got = (fn() for fn in variants.values())
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))
    print(f"max relative difference of the meta-gradients: {err:.2e}")

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved: machine noise hits both alike
        for name, fn in variants.items():
            times[name].append(Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median)
    rows = []
    for name, fn in variants.items():
        median = statistics.median(times[name])
        rows.append({"variant": name, "tasks_per_s": T / median, "ms_per_meta_step": 1e3 * median,
                     "aten_ops_per_meta_step": count_aten_ops(fn).total})
    loop, fast = rows
    write_csv("maml_sinusoid.csv", rows)
    print(f"\nMAML sinusoid, MLP 1-40-40-1, T={T}, K={K}, {args.steps} inner step(s), second order, "
          f"{torch.get_num_threads()} threads")
    print_table(rows, [("variant", "variant", "16s"), ("tasks_per_s", "tasks/s", "10.0f"),
                       ("ms_per_meta_step", "ms/step", "9.2f"), ("aten_ops_per_meta_step", "ATen ops", "9d")],
                rule=False)
    print(f"speed-up {fast['tasks_per_s'] / loop['tasks_per_s']:.1f}x, "
          f"ops ratio {fast['aten_ops_per_meta_step'] / loop['aten_ops_per_meta_step']:.3f}")


if __name__ == "__main__":
    main()
