"""``rlaif-mlx make-tasks``: write the generated task family (train and held-out JSONL files)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    make = sub.add_parser(
        "make-tasks",
        help="write the generated function-task family: families_train.jsonl and families_heldout.jsonl, "
        "split by template parameters (held-out tasks are new instances)",
    )
    make.add_argument("folder", help="folder to write the two files into (existing files are never replaced)")
    make.add_argument("--seed", type=int, default=0, help="decides the split and the test inputs (default 0)")
    make.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data.families import generate_tasks, write_task_files

    try:
        train_path, heldout_path = write_task_files(Path(args.folder), seed=args.seed)
    except (FileExistsError, NotADirectoryError) as exc:
        raise UserError(str(exc)) from None
    train, heldout = generate_tasks(seed=args.seed)
    print(f"wrote {len(train)} training tasks to {train_path} and {len(heldout)} held-out tasks to {heldout_path}")
    return 0
