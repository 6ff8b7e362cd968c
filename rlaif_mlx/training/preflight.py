"""Checks that a run can start, made before anything is loaded or written: the model path and the folders.

One model-path check serves ``train`` (and ``eval``, ``export``, ``sample``) and ``doctor``: a path
that looks local (``./``, ``../``, ``/``, ``~``, or a parent folder that exists) is never sent to the
hub, a folder that is not a model says which file it lacks, and ``HF_HUB_OFFLINE`` is honoured
before any download is tried, so a mistake is one line instead of a minute of retries.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
EXAMPLE_HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.npz")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_POINT = f"point model.base_model at a Hugging Face model folder, or a hub id like {EXAMPLE_HUB_ID}"


@dataclass(frozen=True)
class Finding:
    """What a check found.

    Attributes:
        ok: whether the run can go ahead.
        detail: what was found, e.g. ``"models/x does not exist"``.
        fix: what to do about it (empty when nothing needs doing).
        warn: usable, but worth a word (a model that will be downloaded).
        cache_only: a cached hub model with the hub out of reach: load it as under ``HF_HUB_OFFLINE=1``
            (``use_hub_cache_only``), or every file lookup would retry for minutes.
    """

    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False
    cache_only: bool = False

    def line(self, key: str) -> str:
        """The finding as one error line naming the config key: ``key: detail; fix``."""
        return f"{key}: {self.detail}{'; ' + self.fix if self.fix else ''}"


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path on this machine rather than a hub id."""
    if name.startswith(("./", "../", "/", "~", ".\\")) or name in (".", ".."):
        return True
    parent = Path(name).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def check_model_path(name: str, *, build_tiny: bool = False, probe_hub: bool = False) -> Finding:
    """Whether ``model.base_model`` names a model this machine can load.

    Args:
        name: the config's ``model.base_model``.
        build_tiny: ``model.build_tiny_if_missing``: an absent folder will be built.
        probe_hub: for a hub id that is not cached, try one connection to the hub first (``train``);
            ``doctor`` leaves this off, as it never goes over the network.

    Returns:
        The finding: ok for a model folder, a cached hub id, or one the hub will serve.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return _model_folder(path, build_tiny=build_tiny)
    if path.exists():
        return Finding(False, f"{path} is a file, not a model folder", _POINT)
    if build_tiny:
        return Finding(True, f"{path} will be built as the tiny random model (model.build_tiny_if_missing)")
    if looks_local(name) or not HUB_ID.match(name):
        return Finding(False, f"{name} does not exist", _POINT)
    cached = in_hub_cache(name)
    if cached:
        unreachable = hub_unreachable() if probe_hub and not hub_offline() else None
        if unreachable:
            return Finding(
                True, f"{name}: {unreachable}; using the copy in the local Hugging Face cache", cache_only=True
            )
        return Finding(True, f"{name} (hub id, in the local Hugging Face cache)")
    where = "not in the local Hugging Face cache" if cached is False else "the hub cache could not be read"
    found = f"{name}: no such local folder; as a hub id, {where}"
    if hub_offline():
        return Finding(
            False,
            f"{found}, and HF_HUB_OFFLINE is set",
            f"download it while online (hf download {name}), or unset HF_HUB_OFFLINE to let the run download it",
        )
    if not probe_hub:
        return Finding(True, found, f"download it while online (hf download {name}), or fix the path", warn=True)
    unreachable = hub_unreachable()
    if unreachable:
        return Finding(
            False,
            f"{found}, and {unreachable}",
            f"connect to the network, or point model.base_model at a local copy (hf download {name} elsewhere)",
        )
    return Finding(True, f"{name} (hub id, will be downloaded)")


def _model_folder(path: Path, *, build_tiny: bool) -> Finding:
    config = path / "config.json"
    if not config.is_file():
        if build_tiny and not any(path.iterdir()):
            return Finding(True, f"{path} will be built as the tiny random model (model.build_tiny_if_missing)")
        return Finding(False, f"{path} has no config.json, so it is not a Hugging Face model folder", _POINT)
    if not os.access(config, os.R_OK):
        return Finding(False, f"{config} is not readable", f"make {path} readable by this user")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Finding(False, f"{config} is not valid JSON ({exc})", _POINT)
    if not isinstance(settings, dict) or "model_type" not in settings:
        return Finding(False, f"{config} names no model_type, so it is not a model's config", _POINT)
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        return Finding(False, f"{path} holds no weights (*.safetensors or pytorch_model*.bin)", _POINT)
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        return Finding(False, f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])})", _POINT)
    return Finding(True, f"{path} (local folder)")


def use_hub_cache_only() -> None:
    """From here on this process, and those it starts, read the hub cache only, as under ``HF_HUB_OFFLINE=1``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True  # read at its import; transformers and mlx-lm ask it at each lookup


def in_hub_cache(repo_id: str) -> bool | None:
    """Whether the hub model's config.json is in the local cache; None if that cannot be told."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (ValueError, OSError):  # an id the hub rejects (HFValidationError), an unreadable cache: not usable
        return False


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (one connection, no retries), or None when it can."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    try:
        with socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or exc})"


def check_writable(path: Path, key: str, *, file: bool = False) -> Finding:
    """Whether ``path`` (a folder, or a file with ``file``) can be created or written, without writing.

    Args:
        path: the folder or file.
        key: the config key that names it, for the fix.
        file: ``path`` is a file (else a folder).
    """
    if path.exists() and (path.is_dir() == file):
        return Finding(False, f"{path} is a {'folder' if file else 'file'}", f"point {key} elsewhere")
    folder = path.parent if file else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Finding(False, f"{existing} is a file, so {folder} cannot be made", f"point {key} elsewhere")
    target = path if path.exists() else existing
    if os.access(target, os.W_OK) and os.access(existing, os.W_OK | os.X_OK):
        state = "exists, writable" if path.exists() else f"will be created (in {existing.resolve()})"
        return Finding(True, f"{path} {state}")
    return Finding(False, f"{target} is not writable", f"point {key} at a writable place, or fix permissions")
