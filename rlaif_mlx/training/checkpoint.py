"""Checkpoints: one self-contained folder per saved step, written atomically, the last K kept.

A checkpoint folder holds what the backend saves (trainable weights,
optimizer, scheduler), ``trainer_state.json`` (run id, base model, step, KL
coefficient, baselines, data order) and ``config.yaml`` (the run's resolved
config), so it can be resumed or exported without the run folder around it.
It is written under a temporary name and renamed into place, so a crash
mid-write never leaves a folder that looks complete. ``step-NNNNNN`` is saved
after an RL step, ``warmup-NNNNNN`` when a stop signal ends the warm-up.
Pruning removes only checkpoints of the run that wrote them (its run id).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config, save_config

_NAME = re.compile(r"^(step|warmup)-(\d{6,})$")  # warm-up checkpoints come before every RL step's
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"

# Keys a resumed run may change: where it runs, for how long, how it logs and
# saves. Every other key changes what the run means (model shape, data,
# objective, seed), so resuming with a different value is refused. A key here
# covers the keys under it (``logging`` covers ``logging.log_every``).
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "backend",
        "model.base_model",  # the same base may live at another path on another machine
        "model.build_tiny_if_missing",
        "model.dtype",  # e.g. float32 on a laptop, bfloat16 on a GPU server
        "model.torch",
        "model.mlx",
        "data.train_file",  # may live elsewhere on another machine; the curriculum checks the task ids match
        "data.eval_file",
        "training.max_steps",
        "training.num_epochs",
        "training.micro_batch_size",  # memory only: losses are summed over the whole batch
        "training.save_steps",
        "training.save_total_limit",
        "rewards.max_workers",
        "rlaif.sample_ahead",  # a saved sampled-ahead batch is trained on either way
        # how the teacher is reached and paid for, not what it judges
        "teacher.base_url",
        "teacher.api_key_env",
        "teacher.max_concurrency",
        "teacher.timeout_s",
        "teacher.max_retries",
        "teacher.cache_path",
        "teacher.cache_ttl_s",
        "teacher.budget_usd",  # the usual reason to resume after a budget stop
        "teacher.prices",
        "teacher.prompt_cache",
        "logging",
    }
)


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not fit the current config; one line for the user."""


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    output_dir: Path,
    *,
    step: int,
    state: dict[str, Any],
    config: RunConfig,
    save_backend: Callable[[Path], None],
    keep: int,
    warmup_step: int | None = None,
) -> Path:
    """Writes ``checkpoints/step-NNNNNN`` atomically and prunes this run's old ones.

    Args:
        output_dir: the run's output folder.
        step: the optimizer step just completed.
        state: JSON-serialisable trainer state; its ``run_id`` decides which old checkpoints are this run's.
        config: the run's resolved config, written as ``config.yaml``.
        save_backend: writes the backend's files into the folder it is given.
        keep: how many of the newest checkpoints to keep.
        warmup_step: a warm-up checkpoint after this many warm-up steps (``warmup-NNNNNN``).

    Returns:
        The checkpoint folder.
    """
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"warmup-{warmup_step:06d}" if warmup_step is not None else f"step-{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_backend(tmp)
    normal_file_modes(tmp)
    save_config(config, tmp / CONFIG_FILE)
    # The state file goes last: its presence is what marks a checkpoint complete.
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    ours = [p for p in list_checkpoints(output_dir) if _run_id(p) == state.get("run_id")]
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def normal_file_modes(folder: Path) -> None:
    """Gives the files under ``folder`` the mode a new file gets here (0644 under the usual umask 022).

    safetensors writes its files 0600; a checkpoint or an export is meant to be read like any file.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _run_id(checkpoint: Path) -> str | None:
    try:
        return load_trainer_state(checkpoint).get("run_id")
    except (OSError, ValueError):
        return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not listed)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=_order)


def _order(path: Path) -> tuple[bool, int]:
    kind, number = _NAME.match(path.name).groups()
    return kind == "step", int(number)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``.

    Args:
        path: a checkpoint folder (``.../checkpoints/step-NNNNNN``), a run's
            output folder, or its ``checkpoints`` folder.

    Returns:
        ``path`` itself when it is a complete checkpoint, else the newest
        complete checkpoint of the run.

    Raises:
        CheckpointError: nothing there is a complete checkpoint.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if _NAME.match(path.name) and path.parent.name == "checkpoints":  # a checkpoint that is not there
        run = path.parent.parent
        names = [p.name for p in list_checkpoints(run)]
        held = f"{run} holds {', '.join(names)}" if names else f"{run} holds no complete checkpoint"
        raise CheckpointError(f"{path}: no such checkpoint; {held} (or give the run folder {run} for its newest)")
    run = path.parent if path.name == "checkpoints" else path
    found = list_checkpoints(run)
    if not found:
        raise CheckpointError(
            f"{path}: no checkpoint found (expected {checkpoint_dir(run)}/step-NNNNNN holding {STATE_FILE})"
        )
    return found[-1]


def checkpoint_config_path(checkpoint: Path) -> Path:
    """The config a checkpoint was written with.

    Checkpoints written before they held their own ``config.yaml`` fall back to
    the run folder's (``checkpoints/step-N/../../config.yaml``).

    Raises:
        CheckpointError: neither exists.
    """
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint / CONFIG_FILE, checkpoint.parent.parent / CONFIG_FILE):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{checkpoint}: no {CONFIG_FILE} in the checkpoint or its run folder")


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, leaving out those a resumed run may change.

    Args:
        saved: the checkpoint's config as a plain dict (``RunConfig.model_dump``).
        current: the config of the run that would resume it, likewise.

    Returns:
        The differing keys, sorted; empty when the run can resume.
    """
    a, b = _flatten(saved), _flatten(current)
    return sorted(
        key for key in a.keys() | b.keys() if a.get(key, _MISSING) != b.get(key, _MISSING) and not _may_differ(key)
    )


def check_resumable(checkpoint: Path, config: RunConfig) -> None:
    """Refuses to resume a checkpoint under a config that changes what the run means.

    Raises:
        CheckpointError: one line listing the differing keys (or naming the missing config).
    """
    path = checkpoint_config_path(checkpoint)
    saved = load_config(path)
    changed = config_differences(saved.model_dump(mode="json"), config.model_dump(mode="json"))
    if changed:
        raise CheckpointError(
            f"{checkpoint} was written with a different {', '.join(changed)} (see {path}); "
            "resume with the same values or start a new run"
        )


_MISSING = object()


def _may_differ(key: str) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:n]) in RESUMABLE_CHANGES for n in range(1, len(parts) + 1))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
