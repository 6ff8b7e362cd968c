"""Frameworks asked about the machine and about file formats, outside a loaded backend.

``doctor`` lists the devices each framework sees, and ``export --format mlx``
converts a Hugging Face folder with mlx-lm's own converter. Each function
imports its framework when called, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

MLX_GROUP_SIZE = 64  # mlx-lm's default; a layer whose input width does not divide by it stays unquantised


def torch_devices() -> list[str]:
    """The accelerators torch sees (``cuda:0 NAME``, ``mps``); empty on a CPU-only machine."""
    import torch

    found = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def mlx_device() -> tuple[str, bool]:
    """MLX's default device type (``cpu`` or ``gpu``) and whether Metal is available."""
    import mlx.core as mx

    metal = bool(getattr(getattr(mx, "metal", None), "is_available", lambda: False)())
    return mx.default_device().type.name, metal


def convert_to_mlx(hf_folder: Path, out: Path, *, bits: int | None = None) -> None:
    """Converts a Hugging Face model folder to mlx-lm's layout with ``mlx_lm.convert``.

    Args:
        hf_folder: a folder transformers loads (safetensors, config, tokenizer).
        out: where mlx-lm writes (it must not exist yet).
        bits: 4 or 8 to quantise (group size 64); None keeps the weights as they are.

    Raises:
        ImportError: mlx-lm is not installed or does not import.
        ValueError: mlx-lm refuses the model.
    """
    from mlx_lm import convert

    # mlx-lm prints its progress ("[INFO] Loading" ...); the caller prints one line of its own.
    with contextlib.redirect_stdout(io.StringIO()):
        convert(
            str(hf_folder),
            str(out),
            quantize=bits is not None,
            q_bits=bits,
            q_group_size=MLX_GROUP_SIZE if bits is not None else None,
        )
