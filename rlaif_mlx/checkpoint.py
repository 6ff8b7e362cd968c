"""Checkpoints: one folder per saved step, written atomically, the last K kept.

A checkpoint folder holds what the backend saves (trainable weights,
optimizer, scheduler) and ``trainer_state.json`` (step, KL coefficient,
baselines, data order). It is written under a temporary name and renamed into
place, so a crash mid-write never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

_NAME = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    output_dir: Path, *, step: int, state: dict[str, Any], save_backend: Callable[[Path], None], keep: int
) -> Path:
    """Writes ``checkpoints/step-NNNNNN`` atomically and prunes old ones.

    Args:
        output_dir: the run's output folder.
        step: the optimizer step just completed.
        state: JSON-serialisable trainer state.
        save_backend: writes the backend's files into the folder it is given.
        keep: how many of the newest checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_backend(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not listed)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())
