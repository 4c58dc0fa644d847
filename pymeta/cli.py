"""The ``pymeta`` command: train, eval, bench, info, build-ext.

    pymeta train --algo maml --data sinusoid     # meta-train, evaluate, save a checkpoint
    pymeta train ... --nproc 2                   # the same, tasks sharded over 2 processes
    pymeta train ... --resume runs/pymeta-last.pt  # continue an interrupted run exactly
    pymeta eval --checkpoint runs/pymeta.pt      # reload and evaluate on held-out tasks
    pymeta bench ops|meta                        # microbenchmarks / end-to-end comparisons
    pymeta bench gpu OUT_DIR                     # the GPU readiness check (benchmarks/gpu_check.sh)
    pymeta info                                  # versions and which op backends run here
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

import torch

from pymeta import __version__, checkpoint, distributed, training
from pymeta.core.batched import STRATEGIES


def _add_train_args(p: argparse.ArgumentParser) -> None:
    defaults = training.TrainConfig()
    p.add_argument("--algo", default=defaults.algo, help="meta-learning algorithm (default: %(default)s)")
    p.add_argument("--data", default=defaults.data, help="task family: sinusoid, glyphs or folder:PATH (default: %(default)s)")
    p.add_argument("--ways", type=int, help="classes per task (N)")
    p.add_argument("--shots", type=int, help="support examples per class (K)")
    p.add_argument("--queries", type=int, help="query examples per class")
    p.add_argument("--meta-batch", type=int, help="tasks per meta-step (T)")
    p.add_argument("--iterations", type=int, help="outer (meta) steps")
    p.add_argument("--inner-steps", type=int, help="inner-loop SGD steps per task")
    p.add_argument("--inner-lr", type=float, help="inner-loop learning rate")
    p.add_argument("--outer-lr", type=float, help="Adam learning rate of the meta-parameters")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (drop second-order terms)")
    p.add_argument("--strategy", default=defaults.strategy, choices=list(STRATEGIES),
                   help="batched execution strategy (default: %(default)s, measured on the first steps)")
    p.add_argument("--task-chunk", type=int, metavar="K",
                   help="maml/fomaml/metasgd/anil/protonet: meta-gradient K tasks at a time (memory of K tasks' graphs)")
    p.add_argument("--checkpoint-steps", action="store_true",
                   help="maml/metasgd, second order: recompute inner steps in backward (memory for long loops)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each meta-step as a CUDA graph on the first batch and replay it "
                        "(maml/fomaml/metasgd/anil/protonet on --device cuda; inner NaN/inf checks off)")
    p.add_argument("--compile", action="store_true",
                   help="run each training step under torch.compile (the first step compiles, ~10-60 s on a CPU)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--val-every", type=int, help="validate every N steps (default: 10 times per run)")
    p.add_argument("--val-episodes", type=int, default=defaults.val_episodes, help="validation tasks")
    p.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes, help="test tasks")
    p.add_argument("--eval-inner-steps", type=int, help="inner steps at test time (default: --inner-steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=defaults.out,
                   help="checkpoint path of the best model by validation; the latest validation's state goes "
                        "to <stem>-last<suffix> (both written atomically)")
    p.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                   help="skip the NaN/inf checks of inner and outer losses and gradients (one sync per step)")


def _config(args: argparse.Namespace) -> training.TrainConfig:
    names = {f.name for f in fields(training.TrainConfig)}
    return training.TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> int:
    config = _config(args)
    run = (config, args.resume, not args.no_progress, args.plot)
    if args.nproc == 1:
        # Under torchrun (WORLD_SIZE > 1) this joins its process group; alone, it is a no-op.
        with distributed.process_group(timeout=args.dist_timeout):
            _train_and_report(*run)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc starts its own processes; under torchrun, leave it out")
    # Bad options fail here with one clear message, not once per spawned rank.
    resolved = config.resolved()
    if args.resume is not None:
        training.resume_state(args.resume, resolved)
    distributed.launch(_train_and_report, args.nproc, *run, timeout=args.dist_timeout)
    return 0


def _train_and_report(config: training.TrainConfig, resume: str | None, progress: bool, plot: bool) -> None:
    """Train (on every rank of a group); rank 0 prints the summary and draws the curves."""
    result = training.train(config, progress=progress, resume=resume)
    if distributed.rank() != 0:
        return
    print(f"trained in {result.seconds:.1f} s; best checkpoint: {result.checkpoint}, "
          f"last: {training.last_checkpoint_path(result.checkpoint)}")
    if plot:
        png = training.plot_history(result.history, Path(result.checkpoint).with_suffix(".png"),
                                    f"{result.config.algo} on {result.config.data}")
        print(f"learning curves: {png}")


def cmd_eval(args: argparse.Namespace) -> int:
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
    print("op backends:")
    for name, status in ops.backends().items():
        print(f"  {name:10s} {status}")
    return 0


def cmd_build_ext(args: argparse.Namespace) -> int:
    from pymeta.ops import _extension

    failed = False
    for name, reason in _extension.build(verbose=args.verbose).items():
        print(f"  {name:5s} {'built and loaded' if reason is None else 'not built: ' + reason}")
        failed |= name == "cpp" and reason is not None
    return 1 if failed else 0


BENCHMARKS = {"ops": ["bench_inner_sgd.py", "bench_proto.py", "bench_max_pool2d.py"], "meta": ["bench_meta.py"],
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pymeta", description="Fast batched few-shot meta-learning for PyTorch.")
    p.add_argument("--version", action="version", version=f"pymeta {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train, evaluate on held-out tasks, save the best checkpoint")
    _add_train_args(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--resume", metavar="PATH",
                   help="continue from a checkpoint of this run (repeat its options; more --iterations is fine)")
    t.add_argument("--nproc", type=int, default=1,
                   help="local processes sharing each meta-batch's tasks (torch.distributed, gloo on CPU)")
    t.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT,
                   help="seconds a process waits for the others before failing (default: %(default)s)")
    t.add_argument("--plot", action="store_true", help="write a PNG of the learning curves next to the checkpoint")
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
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("build-ext", help="compile the C++ (and, with a GPU, CUDA) extension now")
    x.add_argument("--verbose", action="store_true")
    x.set_defaults(func=cmd_build_ext)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as exc:
        print(f"pymeta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, distributed.WorkerError) as exc:
        print(f"pymeta {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
