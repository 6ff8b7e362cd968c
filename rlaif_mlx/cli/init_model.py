"""``rlaif-mlx init-model``: build the tiny random Qwen2-style model for tests and the quickstart."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    init = sub.add_parser("init-model", help="build a tiny random Qwen2-style model for tests and the quickstart")
    init.add_argument("path", help="folder to write the model into")
    init.add_argument("--tiny", action="store_true", default=True, help="the tiny random model (the only kind)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--force", action="store_true", help="rebuild even if the folder has a model")
    init.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data.tiny_model import build_tiny_model

    path = Path(args.path)
    if (path / "config.json").exists() and not args.force:
        raise UserError(f"{path} already holds a model (use --force to rebuild it)")
    build_tiny_model(path, seed=args.seed)
    print(f"wrote a tiny random Qwen2-style model to {path}")
    return 0
