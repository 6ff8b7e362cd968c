"""``rlaif-mlx train``: RL training from a YAML config, resumable, under torchrun and mlx.launch too."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from .common import UserError, one_line_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="run RL training from a YAML config")
    train.add_argument("--config", required=True, help="path to the run's YAML config")
    train.add_argument("--model", help="override model.base_model (local path or hub id)")
    train.add_argument("--train-file", help="override data.train_file")
    train.add_argument("--eval-file", help="override data.eval_file")
    train.add_argument("--backend", choices=["auto", "torch", "mlx"], help="override backend")
    train.add_argument("--output-dir", help="override output_dir")
    train.add_argument("--max-steps", type=int, help="override training.max_steps")
    train.add_argument("--seed", type=int, help="override seed")
    train.add_argument(
        "--save-every",
        type=int,
        metavar="N",
        help="override training.save_steps: checkpoint every N optimizer steps",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help="continue a run from a checkpoint folder, or from the newest checkpoint of a run folder; "
        "alone, from the newest checkpoint in the config's output_dir",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an output_dir that holds one, moving the old run to <output_dir>.old-N "
        "(nothing is deleted)",
    )
    train.add_argument(
        "--allow-other-base",
        action="store_true",
        help="with --resume: continue a checkpoint on a base model other than the one it was trained from",
    )
    train.add_argument("--no-dashboard", action="store_true", help="print one plain line per step even on a terminal")
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import CLI_OVERRIDES, ConfigError, load_config

    overrides = {path: getattr(args, flag) for flag, path in CLI_OVERRIDES.items()}
    if args.model:
        # A model named on the command line is loaded as is: "Qwen/Qwen2.5-Coder-0.5B" must
        # never become a freshly built random model in a folder of that name.
        overrides["model.build_tiny_if_missing"] = False
    with one_line_errors(ConfigError):
        config = load_config(args.config, overrides=overrides, on_note=lambda note: print(note, file=sys.stderr))
    dist, config = _process_group(config)
    try:
        with contextlib.ExitStack() as stack:
            if not dist.is_main:  # with several processes rank 0 speaks for the run; the others print only errors
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            code = _train(args, config, dist)
        dist.barrier()  # all done before any leaves: gloo aborts a process whose peer left mid-exchange
        return code
    finally:
        dist.close()


def _process_group(config):
    """This process's place under torchrun or mlx.launch (a single process without them), and the config
    with ``backend: auto`` resolved to the launcher's backend; one-line errors."""
    from ..backends import BackendUnavailable, resolve_backend_name
    from ..training.distributed import DistributedSetupError, context_from_env, init_from_env

    with one_line_errors(DistributedSetupError, BackendUnavailable):
        dist = context_from_env()
        if dist.enabled:
            dist.check_batch_size(config.training.batch_size)
            if config.backend == "auto":  # the launcher decides: mlx.launch runs MLX, torchrun runs PyTorch
                config = config.model_copy(update={"backend": dist.engine})
            dist = init_from_env(device=config.model.torch.device, backend=resolve_backend_name(config.backend))
        return dist, config


def _train(args: argparse.Namespace, config, dist) -> int:
    from ..teachers.cost import BudgetExceeded
    from ..teachers.judge import TeacherUnavailable
    from ..training.setup import build_run
    from ..training.trainer import ScoringFailed, StopRequested

    resume = False if args.resume is None else (args.resume or True)
    trainer = build_run(
        config,
        source=args.config,
        resume=resume,
        overwrite=args.overwrite,
        allow_other_base=args.allow_other_base,
        dist=dist,
        dashboard=config.logging.dashboard and not args.no_dashboard,
    )
    output_dir = trainer.output_dir
    if trainer.restored_from is not None:
        warmup = trainer.warmup_progress  # a warm-up checkpoint: the warm-up goes on, then RL from step 0
        where = f"warm-up step {warmup.done} of {warmup.total}" if warmup is not None else f"step {trainer.step}"
        print(f"resuming from {trainer.restored_from} at {where}")
        if trainer.step >= trainer.total_steps:
            print(
                f"nothing to do: step {trainer.step} already reaches the budget of {trainer.total_steps} steps "
                "(raise training.max_steps, e.g. with --max-steps)"
            )
    started = time.perf_counter()
    try:
        records = trainer.run()
    except (ScoringFailed, BudgetExceeded, TeacherUnavailable) as exc:
        saved = (
            f"; the last checkpoint is in {output_dir / 'checkpoints'} (continue with --resume)"
            if trainer.step > 0
            else ""
        )
        raise UserError(f"stopped at step {trainer.step}: {exc}{saved}") from None
    except StopRequested as exc:
        print(f"stopped by {exc} (continue with --resume)", file=sys.stderr)
        return 128 + exc.signum
    finally:
        trainer.close()
    if records and dist.is_main:
        print(summary(output_dir, records, seconds=time.perf_counter() - started, resumed=trainer.restored_from))
    return 0


def summary(output_dir, records: list[dict], *, seconds: float, resumed) -> str:
    """The closing line: the whole run's steps and its mean reward early and late, from ``metrics.jsonl``.

    After a resume the file holds the steps before it too, so the line covers the whole run.
    """
    from ..monitor.metrics import read_metrics

    path = output_dir / "metrics.jsonl"
    run = read_metrics(path) if resumed is not None and path.exists() else records
    k = max(1, len(run) // 4)
    rewards = [float("nan") if r.get("reward_mean") is None else r["reward_mean"] for r in run]  # null: NaN
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    steps = f"{k} steps" if k > 1 else "step"
    a, b = records[0]["step"], records[-1]["step"]
    session = f" ({f'step {a}' if a == b else f'steps {a}-{b}'} in this session)" if len(run) > len(records) else ""
    return (
        f"done: {len(run)} steps{session} in {seconds:.0f}s; mean reward of the first {steps} {first:.3f}, "
        f"of the last {steps} {last:.3f}; metrics in {path}"
    )
