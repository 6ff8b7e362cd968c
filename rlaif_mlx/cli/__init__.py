"""Command line: ``rlaif-mlx train | eval | score | sample | export | doctor | init-model | make-tasks |
migrate-config``.

A small dispatcher: each command is a module of this package with an
``add_parser`` and a ``run``. Importing it stays cheap: frameworks load only
inside commands that need a backend. The library never imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import SetupError
from . import doctor, evaluate, export, init_model, make_tasks, migrate_config, sample, score, train
from .common import UserError

COMMANDS = (train, evaluate, score, sample, export, doctor, init_model, make_tasks, migrate_config)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (2 for a problem the user can fix)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, SetupError) as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:  # a config's errors: one line each
            print(f"error: {line}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``rlaif-mlx`` parser with every command's sub-parser."""
    parser = argparse.ArgumentParser(
        prog="rlaif-mlx",
        description="Reinforcement learning from AI feedback for code models, on MLX or PyTorch from one config.",
    )
    parser.add_argument("--version", action="version", version=f"rlaif-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser
