"""Backend selection. The framework is imported only when its backend is created."""

from __future__ import annotations

import importlib
import importlib.util
import platform

from .base import Backend, BackendUnavailable

INSTALL_COMMANDS = {
    "torch": "pip install 'rlaif-mlx[torch]'  (CUDA users: install the torch build for your CUDA first)",
    "mlx": "pip install 'rlaif-mlx[mlx]'  (on Linux: pip install 'mlx[cpu]' mlx-lm)",
}
_MODULES = {"torch": ("torch", "transformers", "peft"), "mlx": ("mlx", "mlx_lm")}


def frameworks_installed(name: str) -> bool:
    """Whether a backend's frameworks are importable (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in _MODULES[name])


def implemented(name: str) -> bool:
    """Whether this version of rlaif-mlx ships the backend."""
    return importlib.util.find_spec(f"rlaif_mlx.backends.{name}") is not None


def installed(name: str) -> bool:
    """Whether a backend can be created here."""
    return implemented(name) and frameworks_installed(name)


def resolve_backend_name(requested: str) -> str:
    """Turns ``auto`` into a concrete backend name.

    MLX on Apple silicon; PyTorch where CUDA is available; else the first
    installed of PyTorch, MLX.

    Raises:
        BackendUnavailable: nothing usable is installed, or the requested one is missing.
    """
    if requested != "auto":
        if not frameworks_installed(requested):
            raise BackendUnavailable(f"backend '{requested}' is not installed: {INSTALL_COMMANDS[requested]}")
        if not implemented(requested):
            raise BackendUnavailable(f"the '{requested}' backend is not part of this version of rlaif-mlx")
        return requested
    if platform.system() == "Darwin" and platform.machine() == "arm64" and installed("mlx"):
        return "mlx"
    if installed("torch"):
        return "torch"
    if installed("mlx"):
        return "mlx"
    raise BackendUnavailable(f"no backend is installed: {INSTALL_COMMANDS['torch']}  or  {INSTALL_COMMANDS['mlx']}")


def create_backend(name: str, model, training, *, seed: int, total_steps: int) -> Backend:
    """Creates the named backend (``torch`` or ``mlx``) for the given config sections."""
    name = resolve_backend_name(name)
    try:
        module = importlib.import_module(f"rlaif_mlx.backends.{name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("rlaif_mlx"):
            raise BackendUnavailable(f"the '{name}' backend is not part of this version of rlaif-mlx") from None
        raise BackendUnavailable(f"backend '{name}' needs {exc.name}: {INSTALL_COMMANDS[name]}") from None
    return module.create(model, training, seed=seed, total_steps=total_steps)


__all__ = ["Backend", "BackendUnavailable", "create_backend", "installed", "resolve_backend_name"]
