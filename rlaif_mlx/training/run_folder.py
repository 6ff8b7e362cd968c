"""A run's output folder: one run per folder, never overwritten, moved aside only when asked.

A fresh ``train`` into a folder that already holds a run's files is refused with the two ways
on (``--resume``, or ``--overwrite``, which moves the old run into a sibling folder and deletes
nothing). The folder is made only once the run has been set up, so a start that fails leaves
nothing behind. ``run.json`` names the run; its id is also in every checkpoint, so pruning
removes only the checkpoints of the run that wrote them.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

RUN_FILE = "run.json"
# What a run writes into its folder; any of these there means the folder holds a run.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoints", "tensorboard", RUN_FILE)


class RunFolderError(ValueError):
    """The output folder cannot take this run; the message is one line with the ways on."""


def run_entries(output_dir: Path) -> list[str]:
    """The run files already in ``output_dir`` (empty for a new or empty folder)."""
    folder = Path(output_dir)
    return [name for name in RUN_ENTRIES if (folder / name).exists()] if folder.is_dir() else []


def new_run_id() -> str:
    """A run id that sorts by start time: ``20260101-120000-a1b2c3``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def read_run_id(output_dir: Path) -> str | None:
    """The id in ``run.json``, or None (no such file, or one written before run ids)."""
    try:
        return json.loads((Path(output_dir) / RUN_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def aside_folder(output_dir: Path) -> Path:
    """Where ``--overwrite`` would move the run now in ``output_dir``: the first free ``<name>.old-N``."""
    folder = Path(output_dir).resolve()
    n = 1
    while (folder.parent / f"{folder.name}.old-{n}").exists():
        n += 1
    return folder.parent / f"{folder.name}.old-{n}"


def check_fresh_start(output_dir: Path, *, overwrite: bool) -> None:
    """Refuses a fresh run in a folder that holds one, unless it is to be moved aside.

    Raises:
        RunFolderError: one line offering ``--resume`` and ``--overwrite``.
    """
    found = run_entries(output_dir)
    if found and not overwrite:
        raise RunFolderError(
            f"{output_dir} already holds a run ({', '.join(found)}); continue it with --resume, or start "
            f"a new one with --overwrite (moves the old run to {aside_folder(output_dir)}, deleting nothing), "
            "or pick another --output-dir"
        )


def check_resume_target(output_dir: Path, checkpoint: Path, *, overwrite: bool) -> None:
    """Refuses to resume into a folder that holds another run (its records would mix with this one's).

    Resuming a checkpoint of the run in ``output_dir`` itself is fine; so is resuming another
    folder's checkpoint into an empty folder, or into one whose run ``--overwrite`` moves aside.

    Raises:
        RunFolderError: one line naming the ways on.
    """
    own = Path(checkpoint).resolve().parent.parent == Path(output_dir).resolve()
    if own and overwrite:
        raise RunFolderError(
            f"--overwrite would move {checkpoint} aside with the rest of the run it resumes; drop --overwrite "
            "to continue that run, or resume into another --output-dir"
        )
    found = run_entries(output_dir)
    if found and not own and not overwrite:
        raise RunFolderError(
            f"{output_dir} holds another run ({', '.join(found)}); resume {checkpoint} into an empty folder "
            f"with --output-dir, or add --overwrite to move that run to {aside_folder(output_dir)}"
        )


def move_aside(output_dir: Path) -> Path | None:
    """Moves the run files of ``output_dir`` into a new sibling folder; returns it (None: nothing to move).

    Only the files a run writes move; anything else in the folder stays where it is.
    """
    found = run_entries(output_dir)
    if not found:
        return None
    target = aside_folder(output_dir)
    target.mkdir(parents=True)
    for name in found:
        os.replace(Path(output_dir) / name, target / name)  # same disk: a rename, nothing copied
    return target


def write_run_file(output_dir: Path, *, run_id: str, resumed_from: Path | None) -> None:
    """Writes ``run.json`` (the run id, and the checkpoint it resumed from) atomically."""
    record = {"run_id": run_id, "resumed_from": str(resumed_from) if resumed_from is not None else None}
    tmp = Path(output_dir) / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, Path(output_dir) / RUN_FILE)
