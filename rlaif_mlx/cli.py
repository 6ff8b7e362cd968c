"""Command line: ``rlaif-mlx train | export | sample | score | eval | doctor | init-model``.

Importing this module must stay cheap: frameworks load only inside commands
that need a backend.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class _UserError(Exception):
    """Something the user can fix; printed as one line, no traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlaif-mlx",
        description="Reinforcement learning from AI feedback for code models, on MLX or PyTorch from one config.",
    )
    parser.add_argument("--version", action="version", version=f"rlaif-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="run RL training from a YAML config")
    train.add_argument("--config", required=True, help="path to the run's YAML config")
    train.add_argument("--model", help="override model.base_model (local path or hub id)")
    train.add_argument("--train-file", help="override data.train_file")
    train.add_argument("--eval-file", help="override data.eval_file")
    train.add_argument("--backend", choices=["auto", "torch", "mlx"], help="override backend")
    train.add_argument("--output-dir", help="override output_dir")
    train.add_argument("--max-steps", type=int, help="override training.max_steps")
    train.add_argument("--seed", type=int, help="override seed")
    train.add_argument("--save-every", type=int, metavar="N", help="override training.save_steps: checkpoint "
                       "every N optimizer steps")
    train.add_argument(
        "--resume", nargs="?", const="", metavar="CHECKPOINT",
        help="continue a run from a checkpoint folder, or from the newest checkpoint of a run folder; "
             "alone, from the newest checkpoint in the config's output_dir",
    )
    train.add_argument("--no-dashboard", action="store_true",
                       help="print one plain line per step even on a terminal")
    train.set_defaults(func=_train)

    export = sub.add_parser("export", help="write a checkpoint as a merged model (LoRA folded in) that "
                                           "transformers or mlx-lm load as is")
    export.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (run/checkpoints/step-NNNNNN), or a run folder for its newest")
    export.add_argument("--out", required=True, help="folder to write the model and tokenizer into")
    export.add_argument("--format", choices=["hf", "mlx"], default="hf",
                        help="hf: Hugging Face safetensors for transformers (default); mlx: a folder for mlx_lm.load")
    export.add_argument("--quantize", type=int, choices=[4, 8], metavar="{4,8}",
                        help="with --format mlx: quantise the weights to 4 or 8 bits (group size 64)")
    export.add_argument("--backend", choices=["auto", "torch", "mlx"],
                        help="backend to load the checkpoint with (default: the checkpoint config's)")
    export.add_argument("--model", help="override model.base_model, e.g. where the base model lives on this machine")
    export.set_defaults(func=_command("exporting", "export_command"))

    sample = sub.add_parser("sample", help="print completions of a checkpoint for one prompt")
    sample.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (run/checkpoints/step-NNNNNN), or a run folder for its newest")
    sample.add_argument("--prompt", required=True, help="the task, as a user would write it (the chat template "
                                                        "and system prompt of training are added)")
    sample.add_argument("-n", type=int, default=1, help="how many completions (default 1)")
    sample.add_argument("--max-new-tokens", type=int, help="default: the config's rlaif.max_new_tokens")
    sample.add_argument("--temperature", type=float,
                        help="0 is greedy; default: the config's rlaif.generation_temperature")
    sample.add_argument("--backend", choices=["auto", "torch", "mlx"],
                        help="backend to load the checkpoint with (default: the checkpoint config's)")
    sample.add_argument("--model", help="override model.base_model, e.g. where the base model lives on this machine")
    sample.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    sample.set_defaults(func=_command("sampling", "sample_command"))

    doctor = sub.add_parser("doctor", help="check this machine (backends, devices, versions) and, with "
                                           "--config, a run's model, data, teacher key and folders")
    doctor.add_argument("--config", help="a run config to check as well")
    doctor.set_defaults(func=_command("doctor", "doctor_command"))

    score = sub.add_parser("score", help="grade existing completions with the configured graders and teacher")
    score.add_argument("--config", required=True, help="a run config (its rewards and teacher sections are used)")
    score.add_argument("--completions", required=True, help="JSONL: one {task_id, completion} per line")
    score.add_argument("--tasks", help="JSONL tasks matched by id, or humaneval for HumanEval's problems "
                                       "(ids HumanEval/0 ...); default: the config's data.train_file")
    score.add_argument("--out", help="JSONL output, one line per completion (default: stdout)")
    score.set_defaults(func=_score)

    evaluate = sub.add_parser("eval", help="score the eval set (mean reward, pass@k, teacher), base vs checkpoint")
    evaluate.add_argument("--config", required=True, help="a run config (its eval, rewards and teacher sections)")
    evaluate.add_argument("--checkpoint", help="also evaluate this checkpoint folder (or a run folder's newest) "
                                               "and compare it with the base model")
    evaluate.add_argument("--eval-set", help="humaneval, or a JSONL task file (default: the config's data.eval_file)")
    evaluate.add_argument("--max-tasks", type=int, help="evaluate the first N tasks only (overrides eval.max_tasks)")
    evaluate.add_argument("--out", help="also write the metrics as JSON to this file")
    evaluate.set_defaults(func=_command("evaluation", "run_eval_command"))

    init = sub.add_parser("init-model", help="build a tiny random Qwen2-style model for tests and the quickstart")
    init.add_argument("path", help="folder to write the model into")
    init.add_argument("--tiny", action="store_true", default=True, help="the tiny random model (the only kind)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--force", action="store_true", help="rebuild even if the folder has a model")
    init.set_defaults(func=_init_model)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import CLI_OVERRIDES, ConfigError, load_config

    overrides = {path: getattr(args, flag) for flag, path in CLI_OVERRIDES.items()}
    if args.model:
        # A model named on the command line is loaded as is: "Qwen/Qwen2.5-Coder-0.5B" must
        # never become a freshly built random model in a folder of that name.
        overrides["model.build_tiny_if_missing"] = False
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        raise _UserError(str(exc)) from None
    dist = _process_group(config)
    try:
        with contextlib.ExitStack() as stack:
            if not dist.is_main:  # under torchrun rank 0 speaks for the run; the others print only errors
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            code = _run_training(args, config, dist)
        dist.barrier()  # all done before any leaves: gloo aborts a process whose peer left mid-exchange
        return code
    finally:
        dist.close()


def _process_group(config):
    """This process's place under torchrun (a single process without it); one-line errors."""
    from .backends import BackendUnavailable, resolve_backend_name
    from .distributed import DistributedSetupError, context_from_env, init_from_env

    try:
        dist = context_from_env()
        if dist.enabled:
            dist.check_batch_size(config.training.batch_size)
            dist = init_from_env(device=config.model.torch.device, backend=resolve_backend_name(config.backend))
        return dist
    except (DistributedSetupError, BackendUnavailable) as exc:
        raise _UserError(str(exc)) from None


def _run_training(args: argparse.Namespace, config, dist) -> int:
    from .checkpoint import check_resumable, find_checkpoint
    from .config import save_config
    from .data import DataError, load_task_set
    from .reporting import PlainReporter

    output_dir = Path(config.output_dir)
    checkpoint = None
    if args.resume is not None:
        # Checked before anything is written: the run folder's config.yaml may be the
        # only record of an older checkpoint's config.
        try:
            checkpoint = find_checkpoint(args.resume or output_dir)
            check_resumable(checkpoint, config)
        except ValueError as exc:
            raise _UserError(str(exc)) from None
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(config.model.base_model)
    if dist.is_main:
        save_config(config, output_dir / "config.yaml")
        if config.model.build_tiny_if_missing and not (model_path / "config.json").exists():
            from .tiny_model import ensure_tiny_model

            print(f"building the tiny random model at {model_path} (model.build_tiny_if_missing)")
            ensure_tiny_model(model_path)
    dist.barrier()  # the others load the model rank 0 may have just built
    try:
        train = load_task_set(config.data.train_file, on_bad_line=config.data.on_bad_line)
        periodic = config.eval.every_steps and config.data.eval_file
        eval_set = load_task_set(config.data.eval_file, on_bad_line=config.data.on_bad_line) if periodic else None
    except DataError as exc:
        raise _UserError(str(exc)) from None
    if train.skipped_lines:
        print(f"skipped {train.skipped_lines} bad line(s) in {train.source} (data.on_bad_line: skip)")

    from .rewards import RewardPipeline
    from .teachers.cost import BudgetExceeded
    from .teachers.judge import TeacherUnavailable
    from .trainer import ScoringFailed, StopRequested, Trainer, total_optimizer_steps

    backend = _create_backend(config, total_steps=total_optimizer_steps(config, len(train.tasks)),
                              source=args.config)
    trainable, total = backend.trainable_parameter_count()
    print(f"backend {backend.name} on {backend.device}  model {config.model.base_model}  "
          f"trainable {trainable:,} of {total:,} parameters ({'LoRA' if config.model.use_lora else 'full'})")
    print(f"{len(train.tasks)} training tasks from {config.data.train_file}  output {output_dir}")
    if dist.enabled:
        sharded = "; weights, gradients and AdamW state sharded (FSDP)" if config.model.torch.fsdp else ""
        print(f"torchrun: {dist.world_size} processes, {config.training.batch_size // dist.world_size} of the "
              f"{config.training.batch_size} prompts of each step on each; gradients summed{sharded}")
    from .sandbox import sandbox_capabilities

    caps = sandbox_capabilities()
    print(f"sandbox: {caps['mode']} (network isolated: {caps['network_isolated']}, "
          f"read-only outside its folder: {caps['fs_readonly']})")
    rewards = RewardPipeline(config.rewards, teacher=_create_teacher(config, source=args.config))
    from .dashboard import make_reporter

    reporter = make_reporter(dashboard=config.logging.dashboard and not args.no_dashboard,
                             log_every=config.logging.log_every) if dist.is_main else PlainReporter(lambda line: None)
    trainer = Trainer(config, backend=backend, train=train, rewards=rewards, output_dir=output_dir,
                      reporter=reporter, eval_tasks=eval_set, dist=dist)
    if checkpoint is not None:
        try:
            trainer.restore(checkpoint)
        except (ValueError, OSError) as exc:  # the weights or data order do not fit this model or task list
            raise _UserError(f"cannot resume from {checkpoint}: {_first_line(exc)}") from None
        print(f"resuming from {checkpoint} at step {trainer.step}")
        if trainer.step >= trainer.total_steps:
            print(f"nothing to do: step {trainer.step} already reaches the budget of {trainer.total_steps} steps "
                  "(raise training.max_steps, e.g. with --max-steps)")
    started = time.perf_counter()
    try:
        records = trainer.run()
    except (ScoringFailed, BudgetExceeded, TeacherUnavailable) as exc:
        saved = f"; the last checkpoint is in {output_dir / 'checkpoints'} (continue with --resume)" \
            if trainer.step > 0 else ""
        raise _UserError(f"stopped at step {trainer.step}: {exc}{saved}") from None
    except StopRequested as exc:
        print(f"stopped by {exc} (continue with --resume)", file=sys.stderr)
        return 128 + exc.signum
    finally:
        if rewards.teacher is not None:
            rewards.teacher.close()
    if records:
        k = max(1, len(records) // 4)
        first = sum(r["reward_mean"] for r in records[:k]) / k
        last = sum(r["reward_mean"] for r in records[-k:]) / k
        print(f"done: {len(records)} steps in {time.perf_counter() - started:.0f}s; mean reward of the first "
              f"{k} steps {first:.3f}, of the last {k} steps {last:.3f}; metrics in {output_dir / 'metrics.jsonl'}")
    return 0


def _command(module: str, name: str):
    """A command whose body lives in ``rlaif_mlx.<module>``, imported only when it runs (keeps this module cheap)."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(args)

    return run


def _create_backend(config, *, total_steps: int, source: str, hint: str = ""):
    """Creates the config's backend; a missing framework or model becomes one ``_UserError`` line.

    Args:
        config: the run config (backend, model, training, seed).
        total_steps: planned optimizer steps, for the LR schedule.
        source: the config file, named in the error.
        hint: appended to the error when the base model cannot be loaded.
    """
    from .backends import BackendUnavailable, create_backend

    try:
        return create_backend(config.backend, config.model, config.training, seed=config.seed,
                              total_steps=total_steps)
    except BackendUnavailable as exc:
        raise _UserError(str(exc)) from None
    except OSError as exc:  # transformers / mlx-lm: no such folder, or not reachable on the hub
        raise _UserError(f"{source}: model.base_model {config.model.base_model!r} cannot be loaded: "
                         f"{_first_line(exc)}{hint}") from None
    except ValueError as exc:  # the backend refuses this model with these settings; the message names the key
        raise _UserError(f"{source}: {_first_line(exc)}") from None


def _score(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .data import DataError, load_task_set
    from .rewards import RewardPipeline
    from .scoring import read_completions, score_completions
    from .teachers.cost import BudgetExceeded
    from .teachers.judge import TeacherUnavailable

    try:
        config = load_config(args.config)
        tasks = load_task_set(args.tasks or config.data.train_file, on_bad_line=config.data.on_bad_line).by_id()
        lines = read_completions(Path(args.completions), tasks)
    except (ConfigError, DataError) as exc:
        raise _UserError(str(exc)) from None
    pipeline = RewardPipeline(config.rewards, teacher=_create_teacher(config, source=args.config))
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        summary = score_completions(lines, tasks, pipeline, out)
    except (BudgetExceeded, TeacherUnavailable) as exc:
        raise _UserError(f"stopped: {exc}") from None
    finally:
        if out is not sys.stdout:
            out.close()
        if pipeline.teacher is not None:
            pipeline.teacher.close()
    spent = f", teacher spend ${pipeline.teacher.ledger.spent_usd:.4f}" if pipeline.teacher is not None else ""
    print(f"scored {summary['scored']} of {len(lines)} completions (mean reward {summary['reward_mean']:.3f}), "
          f"{summary['unscored']} could not be scored{spent}", file=sys.stderr)
    return 0


def _create_teacher(config, *, source: str):
    """The configured teacher, or None; a missing key or unknown price becomes one ``_UserError`` line."""
    if config.teacher.provider == "none":
        return None
    from .teachers.judge import Teacher

    try:
        return Teacher(config.teacher)
    except ValueError as exc:  # MissingApiKey, no price for a budget, an unusable cache file
        raise _UserError(f"{source}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _init_model(args: argparse.Namespace) -> int:
    from .tiny_model import build_tiny_model

    path = Path(args.path)
    if (path / "config.json").exists() and not args.force:
        raise _UserError(f"{path} already holds a model (use --force to rebuild it)")
    build_tiny_model(path, seed=args.seed)
    print(f"wrote a tiny random Qwen2-style model to {path}")
    return 0


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy: the commands in other modules raise its _UserError.
    from rlaif_mlx.cli import main as _main

    sys.exit(_main())
