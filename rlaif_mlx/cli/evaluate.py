"""``rlaif-mlx eval``: the eval set's mean reward, pass@k and teacher score, base model vs a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .common import UserError, first_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="score the eval set (mean reward, pass@k, teacher), base vs checkpoint")
    evaluate.add_argument("--config", required=True, help="a run config (its eval, rewards and teacher sections)")
    evaluate.add_argument(
        "--checkpoint",
        help="also evaluate this checkpoint folder (or a run folder's newest) and compare it with the base model",
    )
    evaluate.add_argument("--eval-set", help="humaneval, or a JSONL task file (default: the config's data.eval_file)")
    evaluate.add_argument("--max-tasks", type=int, help="evaluate the first N tasks only (overrides eval.max_tasks)")
    evaluate.add_argument("--out", help="also write the metrics as JSON to this file")
    evaluate.add_argument(
        "--allow-other-base",
        action="store_true",
        help="evaluate the checkpoint on a base model other than the one it was trained from",
    )
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``rlaif-mlx eval``: the base model, and a checkpoint when given, on one eval set.

    Args:
        args: ``config``, ``checkpoint`` (or None), ``eval_set`` (or None: the
            config's ``data.eval_file``), ``max_tasks`` (or None) and ``out`` (or None).

    Returns:
        The exit status (0). Problems a user can fix raise ``UserError``.
    """
    from ..config import ConfigError, load_config
    from ..data import load_task_set
    from ..data.tasks import DataError
    from ..rewards.pipeline import RewardPipeline
    from ..teachers.cost import BudgetExceeded
    from ..teachers.judge import TeacherUnavailable
    from ..training.checkpoint import find_checkpoint
    from ..training.evaluation import evaluate
    from ..training.fingerprint import check_base
    from ..training.setup import create_backend, create_teacher, ensure_model

    try:
        config = load_config(
            args.config, overrides={"eval.max_tasks": args.max_tasks}, on_note=lambda note: print(note, file=sys.stderr)
        )
        checkpoint = find_checkpoint(args.checkpoint) if args.checkpoint else None
        warning = (
            check_base(checkpoint, config.model.base_model, allow_other=args.allow_other_base) if checkpoint else None
        )
        eval_set = args.eval_set or config.data.eval_file
        if not eval_set:
            raise UserError(
                f"{args.config}: no eval set; name one with --eval-set (humaneval, or a JSONL task "
                "file) or set data.eval_file in the config"
            )
        tasks = load_task_set(eval_set, on_bad_line=config.data.on_bad_line)
    except (ConfigError, DataError, ValueError) as exc:  # CheckpointError is a ValueError phrased as one line
        raise UserError(str(exc)) from None
    if warning:
        print(warning, file=sys.stderr)
    ensure_model(config, log=lambda line: print(line, file=sys.stderr))
    backend = create_backend(  # no optimizer steps: any count does
        config, total_steps=1, source=args.config, log=lambda line: print(line, file=sys.stderr)
    )
    pipeline = RewardPipeline(config.rewards, teacher=create_teacher(config, source=args.config))
    count = min(len(tasks.tasks), config.eval.max_tasks or len(tasks.tasks))
    print(
        f"evaluating {count} tasks from {tasks.source}, {config.eval.num_samples} sample(s) each "
        f"(backend {backend.name} on {backend.device})",
        file=sys.stderr,
    )

    def progress(label: str) -> Callable[[str], None]:
        return lambda line: print(f"{label} {line}", file=sys.stderr)

    started = time.perf_counter()
    try:
        base = evaluate(backend, tasks.tasks, pipeline, config, log=progress("base model"))
        trained = None
        if checkpoint is not None:
            try:
                backend.load(checkpoint)
            except (ValueError, OSError) as exc:  # another model or LoRA shape than the config's
                raise UserError(
                    f"{checkpoint}: cannot be loaded with {args.config}'s model settings: {first_line(exc)}"
                ) from None
            trained = evaluate(backend, tasks.tasks, pipeline, config, log=progress("checkpoint"))
    except DataError as exc:
        raise UserError(str(exc)) from None
    except (BudgetExceeded, TeacherUnavailable) as exc:
        raise UserError(f"stopped: {exc}") from None
    finally:
        if pipeline.teacher is not None:
            pipeline.teacher.close()
    print(f"evaluated in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    print_comparison(base, trained, rich=sys.stdout.isatty())
    if args.out:
        report = {
            "eval_set": tasks.source,
            "config": str(args.config),
            "checkpoint_path": str(checkpoint) if checkpoint is not None else None,
            "base": _json_floats(base),
            "checkpoint": _json_floats(trained) if trained is not None else None,
            "delta": _json_floats(_delta(base, trained)) if trained is not None else None,
        }
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def print_comparison(base: dict[str, float], trained: dict[str, float] | None, *, rich: bool) -> None:
    """Prints metric, base (and checkpoint, delta) as a ``rich`` table or plain aligned text."""
    from ..training.evaluation import format_metric

    header = ["metric", "base"] + (["checkpoint", "delta"] if trained is not None else [])
    delta = _delta(base, trained) if trained is not None else {}
    rows = []
    for key in list(base) + [k for k in (trained or {}) if k not in base]:
        row = [key.removeprefix("eval/"), format_metric(base.get(key))]
        if trained is not None:
            row += [format_metric(trained.get(key)), format_metric(delta.get(key), signed=True)]
        rows.append(row)
    if rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="evaluation")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _delta(base: dict[str, float], trained: dict[str, float] | None) -> dict[str, float]:
    return {k: trained[k] - base[k] for k in base if trained is not None and k in trained}


def _json_floats(metrics: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: a metric with nothing to average becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
