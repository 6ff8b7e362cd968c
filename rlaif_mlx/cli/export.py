"""``rlaif-mlx export``: a checkpoint as a merged model that transformers or mlx-lm load as is.

Two formats:

- ``hf`` (default): the backend's own ``export``, a Hugging Face folder
  (``model.safetensors``, ``config.json``, tokenizer) with LoRA folded in.
- ``mlx``: that folder converted by mlx-lm's own ``mlx_lm.convert``, optionally
  quantised (``--quantize 4|8``, group size 64). Going through the Hugging Face
  folder means it works whichever backend loaded the checkpoint, and the MLX
  layout is exactly the one mlx-lm writes and reads.

The checkpoint is loaded by the library's ``training.setup.load_checkpoint``,
as ``rlaif-mlx sample`` loads it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import UserError, first_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="write a checkpoint as a merged model (LoRA folded in) that transformers or mlx-lm load as is"
    )
    export.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder (run/checkpoints/step-NNNNNN), or a run folder for its newest",
    )
    export.add_argument("--out", required=True, help="folder to write the model and tokenizer into")
    export.add_argument(
        "--format",
        choices=["hf", "mlx"],
        default="hf",
        help="hf: Hugging Face safetensors for transformers (default); mlx: a folder for mlx_lm.load",
    )
    export.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        metavar="{4,8}",
        help="with --format mlx: quantise the weights to 4 or 8 bits (group size 64)",
    )
    export.add_argument(
        "--backend",
        choices=["auto", "torch", "mlx"],
        help="backend to load the checkpoint with (default: the checkpoint config's)",
    )
    export.add_argument("--model", help="override model.base_model, e.g. where the base model lives on this machine")
    export.add_argument(
        "--allow-other-base",
        action="store_true",
        help="load the checkpoint onto a base model other than the one it was trained from",
    )
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``rlaif-mlx export``; returns the exit code."""
    from ..training.checkpoint import normal_file_modes
    from ..training.setup import load_checkpoint

    fmt, bits = args.format, args.quantize
    if bits is not None and fmt != "mlx":
        raise UserError(
            f"--quantize {bits} needs --format mlx: transformers cannot read MLX's quantised "
            "weights, so a Hugging Face export stays unquantised"
        )
    if fmt == "mlx":
        from ..backends import INSTALL_COMMANDS, frameworks_installed

        if not frameworks_installed("mlx"):  # checked before the slow checkpoint load
            raise UserError(f"--format mlx converts with mlx-lm, which is not installed: {INSTALL_COMMANDS['mlx']}")
    loaded = load_checkpoint(
        args.checkpoint,
        backend=args.backend,
        model=args.model,
        allow_other_base=args.allow_other_base,
        log=lambda line: print(line, file=sys.stderr),
    )
    out = Path(args.out)
    if fmt == "hf":
        loaded.backend.export(out)
        normal_file_modes(out)
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
        UserError: mlx-lm refuses the model (one line).
    """
    from ..backends.formats import convert_to_mlx
    from ..training.checkpoint import normal_file_modes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        hf, converted = Path(tmp) / "hf", Path(tmp) / "mlx"
        backend.export(hf)
        try:
            convert_to_mlx(hf, converted, bits=bits)
        except ImportError as exc:  # installed but broken, e.g. a missing shared library
            raise UserError(f"--format mlx: mlx-lm does not import: {first_line(exc)}") from None
        except ValueError as exc:
            raise UserError(f"mlx-lm cannot convert this model: {first_line(exc)}") from None
        out.mkdir(parents=True, exist_ok=True)
        normal_file_modes(converted)
        for file in converted.iterdir():
            os.replace(file, out / file.name)
