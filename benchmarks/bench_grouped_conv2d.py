"""3x3 conv layers on CPU: pymeta's C++ kernels against oneDNN's (``pymeta.ops.grouped_conv2d``).

Part 1, the forward, input and weight gradient of stride-1 3x3 convolutions on a conv4
MAML task's shapes: the first layer (tap loops, up to ``MAX_KERNEL_INPUT_CHANNELS``
input channels per group) on 75 query and 5 support Omniglot images (1 channel, 28 x 28,
64 filters) and on 75 miniImageNet images (3 channels, 84 x 84, 32 filters); 4 and 8
channels at 14 x 14, past the tap loops' bound; the 64-channel layers at 14 x 14 (75 and
5 images), 10 x 10 and 7 x 7 (Winograd, from ``WINOGRAD_MIN_OUTPUT`` a side). ATen
(``F.conv2d``, ``convolution_backward``) against ``pymeta_cpu::grouped_conv2d`` /
``grouped_conv2d_input_grad`` / ``grouped_conv2d_weight_grad``, checked equal first;
medians of ``--repeats`` interleaved rounds of ``--calls`` calls each.

Part 2, an A/B of whole conv4 second-order MAML meta-steps (``bench_meta.py``'s workload
(b), pymeta ``lowered``, ``task_chunk=1``) with Winograd on and off
(``WINOGRAD_MIN_OUTPUT`` out of reach), alternating in one process: the median of the
per-round time ratios.

    python benchmarks/bench_grouped_conv2d.py [--threads 1] [--repeats 7] [--calls 10] [--steps 4]
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from bench_max_pool2d import cpu_kernel_args, interleaved_medians, meta_step_ab
from measure import print_table, write_csv

# The module, not the function pymeta.ops re-exports under the same name.
grouped_conv2d_module = importlib.import_module("pymeta.ops.grouped_conv2d")

# (images, input channels, size, filters)
SHAPES = [(75, 1, 28, 64), (5, 1, 28, 64), (75, 3, 84, 32), (75, 4, 14, 64), (75, 8, 14, 64), (75, 16, 14, 64),
          (75, 32, 14, 64), (75, 64, 14, 64),
          (5, 64, 14, 64), (75, 64, 10, 64), (75, 64, 7, 64)]
BACKWARD = [0, 0], 1  # output padding, groups
OPTIONS = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


def kernel_row(images: int, channels: int, size: int, filters: int, repeats: int, calls: int) -> dict[str, object]:
    x, weight = torch.randn(images, channels, size, size), torch.randn(filters, channels, 3, 3)
    bias, grad = torch.randn(filters), torch.randn(images, filters, size, size)
    forward = {
        "aten": lambda x: F.conv2d(x, weight, bias, padding=1),
        "cpp": lambda x: torch.ops.pymeta_cpu.grouped_conv2d(x, weight, bias, *OPTIONS),
    }
    input_grad = {
        "aten": lambda x: torch.ops.aten.convolution_backward(
            grad, x, weight, None, *OPTIONS[:3], False, *BACKWARD, [True, False, False])[0],
        "cpp": lambda x: torch.ops.pymeta_cpu.grouped_conv2d_input_grad(grad, x, weight, *OPTIONS),
    }
    weight_grad = {
        "aten": lambda x: torch.ops.aten.convolution_backward(
            grad, x, weight, None, *OPTIONS[:3], False, *BACKWARD, [False, True, False])[1],
        "cpp": lambda x: torch.ops.pymeta_cpu.grouped_conv2d_weight_grad(grad, x, weight, *OPTIONS),
    }
    row: dict[str, object] = {"shape": f"{[images, channels, size, size]} -> {filters}"}
    for part, fns in (("forward", forward), ("input_grad", input_grad), ("weight_grad", weight_grad)):
        # The same results before timing, up to float32 sums (oneDNN's weight gradient on
        # [75, 3, 84, 84] is 2e-5 of its largest value from float64, the C++ one 5e-7).
        ours, theirs = fns["cpp"](x), fns["aten"](x)
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), f"{row['shape']}: {part} differs"
        med = interleaved_medians(fns, x, repeats, calls)
        row.update({f"{part}_aten_ms": 1e3 * med["aten"], f"{part}_cpp_ms": 1e3 * med["cpp"],
                    f"{part}_aten_over_cpp": med["aten"] / med["cpp"]})  # fmt: skip
    taps = channels <= grouped_conv2d_module.MAX_KERNEL_INPUT_CHANNELS
    why_not = grouped_conv2d_module.slower(x, weight, list(OPTIONS[1]))
    row["used"] = "aten" if why_not else "taps" if taps else "winograd"
    return row


def main() -> None:
    args = cpu_kernel_args(__doc__, "bench_grouped_conv2d", calls=10, steps=4)
    if args is None:
        return
    rows = [kernel_row(*shape, args.repeats, args.calls) for shape in SHAPES]
    write_csv(args.out_dir / f"grouped_conv2d_{args.threads}threads.csv", rows)
    print(f"\n3x3 convolution, stride 1, padding 1, {args.threads} thread(s), median of {args.repeats} rounds; "
          f"'used' = what pymeta.ops.grouped_conv2d runs for that shape (taps, winograd or aten)")  # fmt: skip
    columns = [("shape", "shape", "26s")]
    for part, title in (("forward", "fwd"), ("input_grad", "grad x"), ("weight_grad", "grad w")):
        columns += [(f"{part}_aten_ms", f"{title} ATen ms", "13.2f"), (f"{part}_cpp_ms", f"{title} C++ ms", "12.2f"),
                    (f"{part}_aten_over_cpp", "ATen/C++", "8.2f")]
    print_table(rows, [*columns, ("used", "used", "8s")])
    if args.steps:
        ab = meta_step_ab(args.steps, grouped_conv2d_module, "WINOGRAD_MIN_OUTPUT")
        print(f"\nconv4 2nd-order MAML meta-step (32 tasks, lowered, task_chunk=1), {args.steps} alternating rounds: "
              f"Winograd {ab['on_s']:.3f} s, oneDNN {ab['off_s']:.3f} s, ratio {ab['off_over_on']:.3f}x")


if __name__ == "__main__":
    main()
