"""The ``pymeta`` command: train, eval, bench, info, build-ext.

    pymeta train --algo maml --data sinusoid     # meta-train, evaluate, save a checkpoint
    pymeta train ... --nproc 2                   # the same, tasks sharded over 2 processes
    pymeta train ... --resume runs/pymeta-last.pt  # continue an interrupted run exactly
    pymeta eval --checkpoint runs/pymeta.pt      # reload and evaluate on held-out tasks
    pymeta bench ops|meta                        # microbenchmarks / end-to-end comparisons
    pymeta bench gpu OUT_DIR                     # the GPU readiness check (benchmarks/gpu_check.sh)
    pymeta info [--workload sinusoid]            # versions, op backends, which ones a workload uses
    pymeta build-ext                             # compile the C++/CUDA extension ahead of time
"""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

import torch

from pymeta import __version__, _malloc, _settings, checkpoint, distributed, training
from pymeta.algorithms import LEARNERS
from pymeta.core.batched import STRATEGIES


def _per_data(name: str) -> str:
    """Help text for a setting whose default depends on the data (and the algorithm)."""
    values = ", ".join(f"{kind} {d[name]}" for kind, d in training.DATA_DEFAULTS.items()
                       if not (name == "ways" and kind in _settings.REGRESSION_DATA))
    for learner in dict.fromkeys(LEARNERS.values()):
        overrides = ", ".join(f"{kind} {d[name]}" for kind, d in learner.cli_defaults.items() if name in d)
        values += f"; {'/'.join(learner.cli_names)}: {overrides}" if overrides else ""
    return f"default per --data: {values}"


def _algos(option: str, but: str = "") -> str:
    """The ``--algo`` names that take the run ``option`` (other than ``but``), for its help text."""
    return "/".join(name for name in training.algos_with(option) if name != but)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    defaults = training.TrainConfig()
    p.add_argument("--algo", default=defaults.algo, choices=sorted(LEARNERS),
                   help="meta-learning algorithm (default: %(default)s)")
    p.add_argument("--data", default=defaults.data, metavar="{sinusoid,glyphs,folder:PATH}",
                   help="task family: sinusoid (regression, MAML paper), glyphs (offline Omniglot-like "
                        "characters) or folder:PATH (image folders, e.g. Omniglot, miniImageNet) "
                        "(default: %(default)s)")
    p.add_argument("--ways", type=int, help=f"classes per task, N ({_per_data('ways')}; sinusoid has none)")
    p.add_argument("--shots", type=int, help=f"support examples per class, K ({_per_data('shots')})")
    p.add_argument("--queries", type=int, help=f"query examples per class ({_per_data('queries')})")
    p.add_argument("--meta-batch", type=int, help=f"tasks per meta-step, T ({_per_data('meta_batch')})")
    p.add_argument("--iterations", type=int, help=f"outer (meta) steps ({_per_data('iterations')})")
    p.add_argument("--inner-steps", type=int, help=f"inner-loop SGD steps per task ({_per_data('inner_steps')})")
    p.add_argument("--inner-lr", type=float, help=f"inner-loop learning rate ({_per_data('inner_lr')})")
    p.add_argument("--outer-lr", type=float,
                   help=f"Adam learning rate of the meta-parameters ({_per_data('outer_lr')})")
    p.add_argument("--first-order", action="store_true",
                   help="first-order MAML: drop second-order terms (default: off, second order)")
    p.add_argument("--strategy", default=defaults.strategy, choices=list(STRATEGIES),
                   help="batched execution strategy: %(choices)s (default: %(default)s, measured on the first steps)")
    p.add_argument("--task-chunk", type=int, metavar="K",
                   help=f"{_algos('task_chunk')}: meta-gradient K tasks at a time, holding K tasks' graphs "
                        "(default: all tasks at once)")
    p.add_argument("--checkpoint-steps", action="store_true",
                   help=f"{_algos('checkpoint_steps', but='fomaml')}, second order: recompute inner steps in "
                        "backward, memory for long loops (default: off)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each meta-step as a CUDA graph on the first batch and replay it "
                        f"({_algos('cuda_graph')} on --device cuda; inner NaN/inf checks off; default: off)")
    p.add_argument("--compile", action="store_true",
                   help="run each training step under torch.compile (the first step compiles, ~10-60 s on a CPU; "
                        "default: off)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="seed of the model's initial weights and of the task streams (training: seed, validation: "
                        "seed + 1, test: seed + 2): the same seed gives the same run (default: %(default)s)")
    p.add_argument("--val-every", type=int, help="validate (and checkpoint) every N steps (default: iterations / 10)")
    p.add_argument("--val-episodes", type=int, default=defaults.val_episodes,
                   help="validation tasks (default: %(default)s)")
    p.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes,
                   help="test tasks (default: %(default)s)")
    p.add_argument("--eval-inner-steps", type=int, help="inner steps at test time (default: --inner-steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on: cpu, cuda or cuda:N; with --nproc, cuda means each process's "
                        "own GPU (default: %(default)s, cuda when torch sees a GPU)")
    p.add_argument("--out", default=defaults.out,
                   help="checkpoint path of the best model by validation; the latest validation's state goes "
                        "to <stem>-last<suffix> (both written atomically); a checkpoint of another config there "
                        "is an error unless --overwrite (default: %(default)s)")
    p.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                   help="skip the NaN/inf checks of inner and outer losses and gradients, one sync per step "
                        "(default: checks on)")


def _config(args: argparse.Namespace) -> training.TrainConfig:
    names = {f.name for f in fields(training.TrainConfig)}
    return training.TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> int:
    config = _config(args)
    run = (config, args.resume, not args.no_progress, args.plot, args.overwrite)
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if not args.dist_timeout > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.nproc == 1:
        # Under torchrun (WORLD_SIZE > 1) this joins its process group; alone, it is a no-op.
        with distributed.process_group(timeout=args.dist_timeout):
            _train_and_report(*run)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc starts its own processes; under torchrun, leave it out")
    # Bad options fail here with one clear message, not once per spawned rank.
    resolved = config.resolved()
    if training.trains_on_episodes(resolved.algo) and resolved.meta_batch < args.nproc:
        raise ValueError(f"--nproc {args.nproc} needs --meta-batch >= {args.nproc} (every process trains on its "
                         f"share of a meta-batch's tasks), got {resolved.meta_batch}")
    if args.resume is not None:
        training.resume_state(args.resume, resolved)
    training.check_out(resolved, args.resume, args.overwrite)
    distributed.launch(_train_and_report, args.nproc, *run, timeout=args.dist_timeout)
    return 0


def _train_and_report(
    config: training.TrainConfig, resume: str | None, progress: bool, plot: bool, overwrite: bool
) -> None:
    """Train (on every rank of a group); rank 0 prints the summary and draws the curves."""
    result = training.train(config, progress=progress, resume=resume, overwrite=overwrite)
    if distributed.rank() != 0:
        return
    print(f"trained in {result.seconds:.1f} s; best checkpoint: {result.checkpoint}, "
          f"last: {training.last_checkpoint_path(result.checkpoint)}")
    if plot:
        png = training.plot_history(result.history, Path(result.checkpoint).with_suffix(".png"),
                                    f"{result.config.algo} on {result.config.data}", result.test,
                                    result.learner.metric_columns)
        print(f"learning curves: {png}")


def cmd_eval(args: argparse.Namespace) -> int:
    for name, value, low in (("--episodes", args.episodes, 1), ("--inner-steps", args.inner_steps, 0)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    learner, spec, config = training.load_learner(args.checkpoint, args.device)
    if args.episodes is not None:
        config.eval_episodes = args.episodes
    if args.inner_steps is not None:
        config.eval_inner_steps = args.inner_steps
    elif config.eval_inner_steps is None:
        config.eval_inner_steps = config.inner_steps
    test, before = training.evaluate_test(learner, spec, config, progress=not args.no_progress)
    print(training.report_line(config, spec, test, before, learner))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pymeta import ops

    print(f"pymeta {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"torch threads: {torch.get_num_threads()}, CUDA available: {torch.cuda.is_available()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    kept = _malloc.keep_freed_memory()  # what a learner of this process gets
    print("CPU allocator: " + (f"glibc, up to {_malloc.TRIM_THRESHOLD >> 20} MiB of freed memory kept for reuse"
                               if kept is True else f"system defaults: {kept}"))  # fmt: skip
    print("op backends:")
    for name, status in ops.backends().items():
        print(f"  {name:10s} {status}")
    if args.workload is not None:
        ops.reset_usage()
        print(f"\nop calls of one meta-step of {_run_workload(args.workload)}:")
        usage = ops.usage()
        width = max((len(op) for op, *_ in usage), default=0)
        for op, backend, reason, calls in usage:
            print(f"  {op:{width}s} {backend:9s} {calls:4d}x  {reason}")
    return 0


WORKLOADS = ("sinusoid", "conv4", "protonet")


def _run_workload(name: str) -> str:
    """One meta-step (loss and backward) of a standard workload on random data; its description."""
    import torch.nn.functional as F

    from pymeta import MAML, ProtoNet, models

    if name == "sinusoid":
        maml = MAML(models.mlp(1, (40, 40), 1), lr=0.01, loss_fn=F.mse_loss)
        x = torch.rand(25, 20, 1) * 10 - 5  # 25 tasks, 10 support and 10 query points each
        F.mse_loss(maml.episode(x[:, :10], x[:, :10].sin(), x[:, 10:]), x[:, 10:].sin()).backward()
        return "sinusoid (second-order MAML, MLP 1-40-40-1, 25 tasks, 10 shots)"
    T, N, Q = 4, 5, 15  # 5-way 1-shot tasks with 15 queries per class
    images, labels = torch.randn(T, N * (1 + Q), 1, 28, 28), torch.arange(N).repeat(T, 1 + Q)
    learner = MAML(models.conv4(1, N), lr=0.4, loss_fn=F.cross_entropy) if name == "conv4" else (
        ProtoNet(models.conv4(1, None)))
    logits = learner.episode(images[:, :N], labels[:, :N], images[:, N:])
    F.cross_entropy(logits.flatten(0, 1), labels[:, N:].flatten()).backward()
    kind = "second-order MAML, conv4" if name == "conv4" else "ProtoNet, conv4 encoder"
    return f"{name} ({kind}, {T} tasks, {N}-way 1-shot, 28x28)"


def cmd_build_ext(args: argparse.Namespace) -> int:
    from pymeta.ops import _extension

    failed = False
    for name, reason in _extension.build(verbose=args.verbose).items():
        print(f"  {name:5s} {'built and loaded' if reason is None else 'not built: ' + reason}")
        failed |= name == "cpp" and reason is not None
    return 1 if failed else 0


BENCHMARKS = {"ops": ["bench_inner_sgd.py", "bench_proto.py", "bench_max_pool2d.py", "bench_batch_norm_relu_pool.py", "bench_grouped_conv2d.py"], "meta": ["bench_meta.py"],
              "gpu": ["gpu_check.sh"]}


def cmd_bench(args: argparse.Namespace) -> int:
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not folder.is_dir():
        print("pymeta bench needs the benchmarks/ folder of a source checkout of pymeta", file=sys.stderr)
        return 2
    for script in BENCHMARKS[args.suite]:
        path = folder / script
        print(f"== {path.name}", flush=True)
        if path.suffix == ".sh":  # gpu_check.sh runs its steps with this Python
            return subprocess.run(["bash", str(path), *args.rest], env={**os.environ, "PYTHON": sys.executable}).returncode
        sys.argv = [str(path), *args.rest]
        runpy.run_path(str(path), run_name="__main__")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the usage of ``train`` alone fills a screen)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pymeta", description="Fast batched few-shot meta-learning for PyTorch.")
    p.add_argument("--version", action="version", version=f"pymeta {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train, evaluate on held-out tasks, save the best checkpoint")
    _add_train_args(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    t.add_argument("--resume", metavar="PATH",
                   help="continue from a checkpoint of this run (repeat its options; more --iterations is fine) "
                        "(default: start afresh)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints at --out even if another config wrote them (default: refuse)")
    t.add_argument("--nproc", type=int, default=1,
                   help="local processes sharing each meta-batch's tasks (torch.distributed, gloo on CPU) "
                        "(default: %(default)s)")
    t.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT,
                   help="seconds a process waits for the others before failing (default: %(default)s)")
    t.add_argument("--plot", action="store_true",
                   help="write a PNG of the learning curves next to the checkpoint (default: off)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on held-out test tasks (mean and 95%% CI)")
    e.add_argument("--checkpoint", required=True, help="path written by pymeta train")
    e.add_argument("--episodes", type=int, help="test tasks (default: the run's --eval-episodes)")
    e.add_argument("--inner-steps", type=int, help="inner steps at test time")
    e.add_argument("--device", default=None)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="run benchmarks from a source checkout")
    b.add_argument("suite", choices=sorted(BENCHMARKS))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark scripts")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions and op backends available here")
    i.add_argument("--workload", choices=WORKLOADS,
                   help="also run one meta-step of this workload and print which backend each op ran on, and why")
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("build-ext", help="compile the C++ (and, with a GPU, CUDA) extension now")
    x.add_argument("--verbose", action="store_true")
    x.set_defaults(func=cmd_build_ext)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (code 2), or --help / --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as exc:
        print(f"pymeta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, distributed.WorkerError) as exc:
        print(f"pymeta {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C: where it stopped, no traceback
        print(f"pymeta {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
