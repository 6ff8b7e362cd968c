"""``rlaif-mlx migrate-config OLD.yaml > NEW.yaml``: a config of the original mlx-rlaif tool, in our form.

Writes the keys the old file sets, under this project's names, as YAML on stdout, led by the
note (as comments) that lists each old key and its new home or why it was left out. The
result is validated first: a file that would not run is refused, every problem on its own line.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from .common import UserError, one_line_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    migrate = sub.add_parser(
        "migrate-config",
        help="rewrite a config of the original mlx-rlaif tool (nested or flat) in this project's form, on stdout",
    )
    migrate.add_argument("config", help="the old config.yaml")
    migrate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prints the migrated config; returns 0, or raises ``UserError``."""
    from pathlib import Path

    from ..config import ConfigError, RunConfig, read_config, validate_config

    with one_line_errors(ConfigError):
        raw, lines, migration = read_config(args.config)
        if migration is None:
            raise UserError(f"{args.config} already uses this project's keys: nothing to migrate")
        validate_config(raw, path=Path(args.config), lines=lines, migration=migration)
    order = list(RunConfig.model_fields)  # our sections in the README's order
    raw = dict(sorted(raw.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    note = migration.note(args.config).splitlines()
    header = "".join(f"# {line.removeprefix('note: ')}\n" for line in note[:-1])
    sys.stdout.write(header + "\n" + yaml.safe_dump(raw, sort_keys=False))
    kept = sum(text.startswith("->") for _, text in migration.lines)
    print(
        f"migrated {args.config}: {kept} key(s) moved, {len(migration.lines) - kept} left out "
        "(listed at the top of the output)",
        file=sys.stderr,
    )
    return 0
