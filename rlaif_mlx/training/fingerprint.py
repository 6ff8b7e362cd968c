"""Which base model a checkpoint was trained from: a cheap fingerprint of its weight files.

A checkpoint holds only what training changed (LoRA adapters, or the trained weights) plus the
optimizer; loaded onto another base of the same shape it would load without complaint and mean
nothing. So every checkpoint records its base: the name, and a fingerprint of the base's weight
files (every tensor's name, dtype and shape, plus a hash of a few slices of a few tensors), read
from the safetensors headers without loading the model. ``--resume``, ``eval`` and ``export``
compare it with the base they are given and refuse a mismatch unless ``--allow-other-base``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, load_trainer_state

SLICE_BYTES = 1 << 16  # read from the start and the end of each sampled tensor
SAMPLED_TENSORS = 4


def base_fingerprint(base_model: str) -> dict[str, Any] | None:
    """``{"name", "fingerprint"}`` of a base model's weights, or None where its files cannot be found.

    Args:
        base_model: ``model.base_model``: a local folder, or a hub id in the local cache.
    """
    folder = model_folder(base_model)
    if folder is None:
        return None
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        return None
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return {"name": base_model, "fingerprint": _fingerprint(stamp)}


def model_folder(base_model: str) -> Path | None:
    """The folder holding ``base_model``'s files: the local folder, or the hub cache's snapshot."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(base_model, "config.json")
    except (ValueError, OSError):
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_base(checkpoint: Path, base_model: str, *, allow_other: bool = False) -> str | None:
    """Refuses to load ``checkpoint`` onto a base other than the one it was trained from.

    Args:
        checkpoint: the checkpoint folder.
        base_model: the base it is about to be loaded onto (``model.base_model``).
        allow_other: ``--allow-other-base``: return a warning instead of refusing.

    Returns:
        None when the bases match (or either cannot be told); with ``allow_other``, a warning line.

    Raises:
        CheckpointError: the fingerprints differ; one line naming both bases.
    """
    saved = load_trainer_state(checkpoint).get("base")
    current = base_fingerprint(base_model)
    if not saved or current is None or saved.get("fingerprint") == current["fingerprint"]:
        return None
    problem = (
        f"{checkpoint} was trained from base model {saved.get('name')} (weights {saved.get('fingerprint')}), "
        f"not {base_model} (weights {current['fingerprint']})"
    )
    if allow_other:
        return f"warning: {problem}; loading it anyway (--allow-other-base)"
    raise CheckpointError(
        f"{problem}; give the base it was trained from (model.base_model, or --model), "
        "or add --allow-other-base to load it anyway"
    )


@functools.lru_cache(maxsize=8)
def _fingerprint(stamp: tuple[tuple[str, int, int], ...]) -> str:
    """The hash of the files in ``stamp`` ((path, size, mtime) each; the cache key)."""
    digest = hashlib.sha256()
    for name, size, _ in stamp:
        path = Path(name)
        if path.suffix == ".safetensors":
            _safetensors(path, digest)
        else:  # a pickled checkpoint: its size and a few slices
            digest.update(str(size).encode())
            _slices(path, 0, size, digest)
    return digest.hexdigest()[:16]


def _safetensors(path: Path, digest: Any) -> None:
    """Every tensor's name, dtype and shape, and slices of a few tensors' bytes, into ``digest``."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    names = sorted(tensors)
    for name in names:
        digest.update(f"{name}:{tensors[name]['dtype']}:{tensors[name]['shape']};".encode())
    step = max(1, len(names) // SAMPLED_TENSORS)
    for name in names[::step][:SAMPLED_TENSORS]:
        start, end = tensors[name]["data_offsets"]
        _slices(path, 8 + length + start, 8 + length + end, digest)


def _slices(path: Path, start: int, end: int, digest: Any) -> None:
    """The first and last ``SLICE_BYTES`` of ``path[start:end]`` (all of it when shorter) into ``digest``."""
    with path.open("rb") as f:
        f.seek(start)
        digest.update(f.read(min(SLICE_BYTES, end - start)))
        if end - start > 2 * SLICE_BYTES:
            f.seek(end - SLICE_BYTES)
            digest.update(f.read(SLICE_BYTES))
        elif end - start > SLICE_BYTES:
            digest.update(f.read(end - start - SLICE_BYTES))
