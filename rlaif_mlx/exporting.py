"""``rlaif-mlx export``: a checkpoint as a merged model that transformers or mlx-lm load as is.

Two formats:

- ``hf`` (default): the backend's own ``export``, a Hugging Face folder
  (``model.safetensors``, ``config.json``, tokenizer) with LoRA folded in.
- ``mlx``: that folder converted by mlx-lm's own ``mlx_lm.convert``, optionally
  quantised (``--quantize 4|8``, group size 64). Going through the Hugging Face
  folder means it works whichever backend loaded the checkpoint, and the MLX
  layout is exactly the one mlx-lm writes and reads.

``load_checkpoint`` (find a checkpoint, read its config, build the backend,
load the weights) is shared with ``rlaif-mlx sample``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import _create_backend, _first_line, _UserError

GROUP_SIZE = 64  # mlx-lm's default; a layer whose input width does not divide by it stays unquantised


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into a backend, ready to sample from or export.

    Attributes:
        path: the checkpoint folder (``.../checkpoints/step-NNNNNN``).
        config: the run config it was saved with, after the command line's overrides.
        config_path: where that config was read from (named in errors).
        step: the optimizer step it was saved at.
        backend: the backend holding its weights.
    """

    path: Path
    config: Any
    config_path: Path
    step: int
    backend: Any


def load_checkpoint(
    checkpoint: str | Path, *, backend: str | None = None, model: str | None = None, seed: int | None = None
) -> LoadedCheckpoint:
    """Finds a checkpoint, reads the config saved with it and loads it into a backend.

    Args:
        checkpoint: a checkpoint folder, or a run folder (its newest checkpoint).
        backend: ``auto``, ``torch`` or ``mlx``; None keeps the checkpoint config's.
        model: where the base model lives on this machine; None keeps the config's.
        seed: overrides the config's seed (the backend's random state).

    Returns:
        The loaded checkpoint.

    Raises:
        _UserError: no checkpoint or config there, a missing framework or base
            model, or weights the backend cannot load; one line each.
    """
    from .checkpoint import checkpoint_config_path, find_checkpoint, load_trainer_state
    from .config import load_config

    overrides: dict[str, Any] = {"backend": backend, "model.base_model": model, "seed": seed}
    if model:
        overrides["model.build_tiny_if_missing"] = False  # as in train: a named model is loaded, never built
    try:  # CheckpointError and ConfigError are ValueErrors phrased as one line
        path = find_checkpoint(checkpoint)
        config_path = checkpoint_config_path(path)
        config = load_config(config_path, overrides=overrides)
        step = int(load_trainer_state(path)["step"])
    except ValueError as exc:
        raise _UserError(str(exc)) from None
    # total_steps only shapes the LR schedule, which neither export nor sample uses.
    steps = max(config.training.max_steps or 0, step, 1)
    hint = "" if model else " (name the base model on this machine with --model)"
    loaded = _create_backend(config, total_steps=steps, source=str(config_path), hint=hint)
    try:
        loaded.load(path)
    except (ValueError, OSError) as exc:
        raise _UserError(f"{path}: cannot be loaded by the {loaded.name} backend: {_first_line(exc)}") from None
    return LoadedCheckpoint(path=path, config=config, config_path=config_path, step=step, backend=loaded)


def export_command(args: argparse.Namespace) -> int:
    """Runs ``rlaif-mlx export`` (arguments as ``cli`` registers them); returns the exit code."""
    fmt, bits = args.format, args.quantize
    if bits is not None and fmt != "mlx":
        raise _UserError(f"--quantize {bits} needs --format mlx: transformers cannot read MLX's quantised "
                         "weights, so a Hugging Face export stays unquantised")
    if fmt == "mlx":
        from .backends import _INSTALL, frameworks_installed

        if not frameworks_installed("mlx"):  # checked before the slow checkpoint load
            raise _UserError(f"--format mlx converts with mlx-lm, which is not installed: {_INSTALL['mlx']}")
    loaded = load_checkpoint(args.checkpoint, backend=args.backend, model=args.model)
    out = Path(args.out)
    if fmt == "hf":
        loaded.backend.export(out)
        print(f"exported {loaded.path} to {out} (backend {loaded.backend.name})")
        return 0
    export_mlx(loaded.backend, out, bits=bits)
    kind = f"{bits}-bit" if bits else "not quantised"
    print(f"exported {loaded.path} to {out} (backend {loaded.backend.name}; MLX format, {kind})")
    return 0


def export_mlx(backend: Any, out: Path, *, bits: int | None = None) -> None:
    """Writes the backend's merged model as an MLX folder that ``mlx_lm.load`` opens as is.

    The Hugging Face export goes to a temporary folder next to ``out`` (same
    disk, so the results are moved, not copied) and mlx-lm converts it.

    Args:
        backend: a backend holding the weights (either kind).
        out: the folder to write; files already there with the same names are replaced.
        bits: 4 or 8 to quantise (group size 64); None keeps the weights as they are.
            mlx-lm leaves a layer whose input width does not divide by 64 unquantised.

    Raises:
        _UserError: mlx-lm refuses the model (one line).
    """
    try:
        from mlx_lm import convert  # only here: the hf format needs no MLX
    except ImportError as exc:  # installed but broken, e.g. a missing shared library
        raise _UserError(f"--format mlx: mlx-lm does not import: {_first_line(exc)}") from None

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        hf, converted = Path(tmp) / "hf", Path(tmp) / "mlx"
        backend.export(hf)
        # mlx-lm prints its progress ("[INFO] Loading" ...); the command prints one line of its own.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                convert(str(hf), str(converted), quantize=bits is not None, q_bits=bits,
                        q_group_size=GROUP_SIZE if bits is not None else None)
            except ValueError as exc:
                raise _UserError(f"mlx-lm cannot convert this model: {_first_line(exc)}") from None
        out.mkdir(parents=True, exist_ok=True)
        for file in converted.iterdir():
            os.replace(file, out / file.name)
