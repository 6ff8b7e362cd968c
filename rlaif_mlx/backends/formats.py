"""Frameworks asked about the machine and about file formats, outside a loaded backend.

``doctor`` lists the devices each framework sees, the memory plan asks how much
memory the chosen device has (``device_memory``), and ``export --format mlx``
converts a Hugging Face folder with mlx-lm's own converter. Each function
imports its framework when called, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
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


def device_memory(backend: str, *, torch_device: str = "auto") -> tuple[int, str]:
    """Bytes the device a backend would run on can give a run, and what that number is.

    MLX on Metal: Metal's recommended working set (the most the GPU should wire);
    PyTorch on CUDA: the GPU's free memory now; on MPS: its recommended maximum;
    otherwise the system's available RAM.

    Args:
        backend: ``mlx`` or ``torch`` (resolved, not ``auto``).
        torch_device: ``model.torch.device``.
    """
    if backend == "mlx":
        import mlx.core as mx

        if bool(getattr(getattr(mx, "metal", None), "is_available", lambda: False)()):
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            if "max_recommended_working_set_size" in info:
                return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
        return system_memory()
    import torch

    if torch_device.startswith("cuda") or (torch_device == "auto" and torch.cuda.is_available()):
        index = torch.device(torch_device if ":" in torch_device else "cuda").index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return int(free), f"free memory of cuda:{index} ({torch.cuda.get_device_name(index)})"
    mps = getattr(torch, "mps", None)
    if torch_device == "mps" and mps is not None and hasattr(mps, "recommended_max_memory"):
        return int(mps.recommended_max_memory()), "MPS's recommended maximum"
    return system_memory()


def system_memory() -> tuple[int, str]:
    """The RAM available to a new allocation now (Linux ``MemAvailable``), else the machine's total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available system RAM"
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "system RAM"


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
