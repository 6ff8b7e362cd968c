"""Command line: ``rlaif-mlx train | init-model``.

Importing this module must stay cheap: frameworks load only inside commands
that need a backend.
"""

from __future__ import annotations

import argparse
import logging
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
    train.set_defaults(func=_train)

    init = sub.add_parser("init-model", help="build a tiny random Qwen2-style model for tests and the quickstart")
    init.add_argument("path", help="folder to write the model into")
    init.add_argument("--tiny", action="store_true", default=True, help="the tiny random model (the only kind)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--force", action="store_true", help="rebuild even if the folder has a model")
    init.set_defaults(func=_init_model)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .backends import BackendUnavailable, create_backend, resolve_backend_name
    from .config import CLI_OVERRIDES, ConfigError, load_config, save_config
    from .data import DataError, load_tasks

    overrides = {path: getattr(args, flag) for flag, path in CLI_OVERRIDES.items()}
    if args.model:
        # A model named on the command line is loaded as is: "Qwen/Qwen2.5-Coder-0.5B" must
        # never become a freshly built random model in a folder of that name.
        overrides["model.build_tiny_if_missing"] = False
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        raise _UserError(str(exc)) from None
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")

    model_path = Path(config.model.base_model)
    if config.model.build_tiny_if_missing and not (model_path / "config.json").exists():
        from .tiny_model import ensure_tiny_model

        print(f"building the tiny random model at {model_path} (model.build_tiny_if_missing)")
        ensure_tiny_model(model_path)
    try:
        train = load_tasks(config.data.train_file, on_bad_line=config.data.on_bad_line)
    except DataError as exc:
        raise _UserError(str(exc)) from None
    if train.skipped_lines:
        print(f"skipped {train.skipped_lines} bad line(s) in {train.source} (data.on_bad_line: skip)")

    from .rewards import RewardPipeline
    from .trainer import ScoringFailed, Trainer, total_optimizer_steps

    try:
        name = resolve_backend_name(config.backend)
        backend = create_backend(name, config.model, config.training, seed=config.seed,
                                 total_steps=total_optimizer_steps(config, len(train.tasks)))
    except BackendUnavailable as exc:
        raise _UserError(str(exc)) from None
    except OSError as exc:  # transformers / mlx-lm: no such folder, or not reachable on the hub
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _UserError(f"{args.config}: model.base_model {config.model.base_model!r} cannot be loaded: {first}")
    trainable, total = backend.trainable_parameter_count()
    print(f"backend {backend.name} on {backend.device}  model {config.model.base_model}  "
          f"trainable {trainable:,} of {total:,} parameters ({'LoRA' if config.model.use_lora else 'full'})")
    print(f"{len(train.tasks)} training tasks from {config.data.train_file}  output {output_dir}")
    from .sandbox import sandbox_capabilities

    caps = sandbox_capabilities()
    print(f"sandbox: {caps['mode']} (network isolated: {caps['network_isolated']}, "
          f"read-only outside its folder: {caps['fs_readonly']})")
    rewards = RewardPipeline(config.rewards)
    trainer = Trainer(config, backend=backend, train=train, rewards=rewards, output_dir=output_dir)
    started = time.perf_counter()
    try:
        records = trainer.run()
    except ScoringFailed as exc:
        raise _UserError(str(exc)) from None
    if records:
        k = max(1, len(records) // 4)
        first = sum(r["reward_mean"] for r in records[:k]) / k
        last = sum(r["reward_mean"] for r in records[-k:]) / k
        print(f"done: {len(records)} steps in {time.perf_counter() - started:.0f}s; mean reward of the first "
              f"{k} steps {first:.3f}, of the last {k} steps {last:.3f}; metrics in {output_dir / 'metrics.jsonl'}")
    return 0


def _init_model(args: argparse.Namespace) -> int:
    from .tiny_model import build_tiny_model

    path = Path(args.path)
    if (path / "config.json").exists() and not args.force:
        raise _UserError(f"{path} already holds a model (use --force to rebuild it)")
    build_tiny_model(path, seed=args.seed)
    print(f"wrote a tiny random Qwen2-style model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
