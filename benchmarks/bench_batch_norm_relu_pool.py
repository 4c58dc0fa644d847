"""BatchNorm + ReLU + 2x2 max-pool on CPU: pymeta's fused kernel against ATen's three.

Part 1, forward + backward of ``relu(max_pool2d(batch_norm(x), 2))`` in train mode on
conv4 activation shapes: ATen's three kernels (with pymeta's max-pool forward, what the
``lowered`` strategy ran before) against ``pymeta.ops.batch_norm_relu_pool``'s C++
kernel; and the second-order path of MAML's support set: forward, a differentiable
backward (``create_graph=True``) and the backward of that (the fused op's double
backward kernel, against autograd's graph of the three ATen ops' derivatives). Medians
of ``--repeats`` interleaved rounds of ``--calls`` calls each.

Part 2, an A/B of whole meta-steps of ``bench_meta.py``'s conv4 workloads (pymeta,
``lowered``, ``task_chunk=1``) with the fused layer on and off
(``pymeta.core.lowered.FUSED_MIN_WIDTH`` raised out of reach), alternating in one
process: the median of the per-round time ratios.

    python benchmarks/bench_batch_norm_relu_pool.py [--threads 1] [--repeats 7] [--calls 10] [--steps 4]
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from bench_max_pool2d import cpu_kernel_args, interleaved_medians, meta_step_ab
from measure import print_table, write_csv

import pymeta.core.lowered as lowered_module
from pymeta import ops

SHAPES = [(75, 64, 28, 28), (5, 64, 28, 28), (75, 64, 14, 14), (75, 64, 7, 7)]  # conv4 query / support maps


def three_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.relu(ops.max_pool2d(F.batch_norm(x, None, None, weight, bias, True), 2))


def forward_backward(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad)


def second_order(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    inputs = (x, weight, bias)
    grads = torch.autograd.grad(fn(*inputs), inputs, grad, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)


def kernel_rows(repeats: int, calls: int) -> list[dict[str, object]]:
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        weight, bias = torch.randn(shape[1], requires_grad=True), torch.randn(shape[1], requires_grad=True)
        grad = torch.randn(*shape[:2], shape[2] // 2, shape[3] // 2)

        fns = {f"{name}{order}": partial(run, fn, weight=weight, bias=bias, grad=grad)
               for name, fn in (("aten", three_kernels), ("fused", ops.batch_norm_relu_pool))
               for order, run in (("", forward_backward), ("_2nd", second_order))}  # fmt: skip
        med = interleaved_medians(fns, x, repeats, calls)
        rows.append({"shape": str(list(shape)), "aten_ms": 1e3 * med["aten"], "fused_ms": 1e3 * med["fused"],
                     "aten_over_fused": med["aten"] / med["fused"], "aten_2nd_ms": 1e3 * med["aten_2nd"],
                     "fused_2nd_ms": 1e3 * med["fused_2nd"], "aten_over_fused_2nd": med["aten_2nd"] / med["fused_2nd"],
                     "used": "fused" if shape[-1] >= lowered_module.FUSED_MIN_WIDTH else "aten"})  # fmt: skip
    return rows


def main() -> None:
    args = cpu_kernel_args(__doc__, "bench_batch_norm_relu_pool", calls=10, steps=4)
    if args is None:
        return
    rows = kernel_rows(args.repeats, args.calls)
    write_csv(args.out_dir / f"batch_norm_relu_pool_{args.threads}threads.csv", rows)
    print(f"\nbatch_norm (train) + max_pool2d(2) + relu, forward + backward, and '2nd': forward, backward with "
          f"create_graph and its backward, {args.threads} thread(s), median of {args.repeats} rounds; 'used' = what "
          f"the lowered strategy runs eagerly for that shape")  # fmt: skip
    print_table(rows, [("shape", "shape", "18s"), ("aten_ms", "ATen ms", "9.2f"), ("fused_ms", "fused ms", "9.2f"),
                       ("aten_over_fused", "ATen/fused", "10.2f"), ("aten_2nd_ms", "2nd ATen", "9.2f"),
                       ("fused_2nd_ms", "2nd fused", "9.2f"), ("aten_over_fused_2nd", "ATen/fused", "10.2f"),
                       ("used", "used", "5s")])  # fmt: skip
    for workload in ("conv4-maml-2nd", "conv4-protonet") if args.steps else ():
        ab = meta_step_ab(args.steps, lowered_module, "FUSED_MIN_WIDTH", workload)
        print(f"{workload} meta-step (lowered, task_chunk=1), {args.steps} alternating rounds: fused "
              f"{ab['on_s']:.3f} s, three kernels {ab['off_s']:.3f} s, ratio {ab['off_over_on']:.3f}x")


if __name__ == "__main__":
    main()
