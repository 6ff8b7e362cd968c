"""The checkpoint layout both backends write and read, so a checkpoint moves between them.

A checkpoint trained with MLX on a laptop continues on a CUDA server with
PyTorch, and back. Every backend writes the same files with the same tensor
names and layouts; only the framework that reads and writes them differs.

Files in a checkpoint folder:

- LoRA: ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's
  layout (``base_model.model.<module>.lora_A.weight`` is ``[r, in]``,
  ``lora_B.weight`` is ``[out, r]``, the update is ``lora_alpha / r * B @ A``),
  so PEFT itself loads the adapter. mlx-lm stores the transposes
  (``lora_a [in, r]``, ``lora_b [r, out]``); the MLX backend converts.
- Full fine-tune: ``model.safetensors`` (or shards + index) under the Hugging
  Face names, with ``config.json`` and ``generation_config.json``.
- ``optimizer.safetensors``: AdamW's moments per trainable tensor,
  ``<weight key>.exp_avg`` and ``<weight key>.exp_avg_sq``, in the weight's
  layout. Both backends use bias-corrected AdamW, so the moments and the step
  count are the whole optimizer state.
- ``reference_model.safetensors`` (only after the reference was rebased): the
  frozen weights under Hugging Face names.
- ``backend_state.json``: the layout version, which backend wrote it, the LR
  schedule and optimizer step counts, the LoRA settings and the state of the
  backend's seed stream (a numpy generator both backends draw their sampling
  and dropout seeds from, so it resumes exactly on either).

Framework-free: names, the JSON files and the compatibility check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rlaif_mlx.config import ModelConfig

FORMAT_VERSION = 2
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FULL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
REFERENCE_FILE = "reference_model.safetensors"
STATE_FILE = "backend_state.json"
HF_CONFIG_FILES = ("config.json", "generation_config.json")
PEFT_PREFIX = "base_model.model."
MOMENTS = ("exp_avg", "exp_avg_sq")


class IncompatibleCheckpoint(ValueError):
    """The checkpoint cannot be loaded into this model; the message says why and what to change."""


def lora_key(module: str, which: str) -> str:
    """The PEFT tensor name of a LoRA matrix: ``which`` is ``"A"`` or ``"B"``.

    ``module`` is the adapted layer's Hugging Face path, e.g.
    ``model.layers.0.self_attn.q_proj``.
    """
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


def moment_key(weight_key: str, moment: str) -> str:
    """The ``optimizer.safetensors`` name of one AdamW moment of one weight."""
    return f"{weight_key}.{moment}"


def lora_settings(model: ModelConfig) -> dict[str, Any] | None:
    """What a LoRA checkpoint must agree on with the model it is loaded into."""
    if not model.use_lora:
        return None
    return {"r": model.lora_r, "lora_alpha": model.lora_alpha, "target_modules": sorted(model.lora_target_modules)}


def peft_adapter_config(model: ModelConfig) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for our adapters (PEFT loads the folder as is)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.base_model,
        "r": model.lora_r,
        "lora_alpha": model.lora_alpha,
        "lora_dropout": model.lora_dropout,
        "target_modules": sorted(model.lora_target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def draw_seed(rng: np.random.Generator) -> int:
    """The next seed for a framework RNG (a sampling key, the dropout masks) from a backend's stream."""
    return int(rng.integers(0, 2**31 - 1))


def write_state(
    path: Path,
    *,
    backend: str,
    model: ModelConfig,
    step: int,
    total_steps: int,
    optimizer_step: int,
    rebased: bool,
    rng: np.random.Generator,
) -> None:
    """Writes ``backend_state.json`` (the RNG stream's exact state included)."""
    state = {
        "format": FORMAT_VERSION,
        "backend": backend,
        "step": step,
        "total_steps": total_steps,
        "optimizer_step": optimizer_step,
        "use_lora": model.use_lora,
        "lora": lora_settings(model),
        "rebased": rebased,
        "rng": rng.bit_generator.state,
    }
    (Path(path) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def read_state(path: Path, model: ModelConfig, *, rebased: bool) -> dict[str, Any]:
    """Reads ``backend_state.json`` and checks the checkpoint fits ``model``'s settings.

    Args:
        path: the checkpoint folder.
        model: the loading backend's model config.
        rebased: whether the loading backend's reference was already rebased.

    Raises:
        IncompatibleCheckpoint: no such file, an unknown layout, LoRA settings that differ
            (naming each differing ``model.*`` key and both values), or a checkpoint from
            before a rebase loaded into a backend after one.
    """
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise IncompatibleCheckpoint(f"{path}: not a checkpoint folder (no {STATE_FILE})")
    state = json.loads(file.read_text())
    if state.get("format") != FORMAT_VERSION:
        raise IncompatibleCheckpoint(
            f"{path}: checkpoint layout {state.get('format')!r} is not this "
            f"version's ({FORMAT_VERSION}); it was written by another rlaif-mlx version"
        )
    if state["use_lora"] != model.use_lora:
        kind = "LoRA" if state["use_lora"] else "full fine-tune"
        raise IncompatibleCheckpoint(
            f"{path} holds a {kind} checkpoint; set model.use_lora: {str(state['use_lora']).lower()} to load it"
        )
    ours = lora_settings(model)
    if ours is not None and state["lora"] != ours:
        names = {"r": "lora_r", "lora_alpha": "lora_alpha", "target_modules": "lora_target_modules"}
        diffs = [
            f"model.{names[k]} is {ours[k]} here but {state['lora'].get(k)} in the checkpoint"
            for k in ours
            if state["lora"].get(k) != ours[k]
        ]
        raise IncompatibleCheckpoint(f"{path}: LoRA settings differ: " + "; ".join(diffs))
    if rebased and not state["rebased"]:
        raise IncompatibleCheckpoint(f"{path} was saved before the reference was rebased; load it into a fresh backend")
    return state


def check_tensors(path: Path, what: str, found: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Checks a checkpoint's tensor names and shapes (name -> shape) against the model's.

    Raises:
        IncompatibleCheckpoint: naming a few missing, unexpected or misshapen tensors.
    """
    if set(found) != set(expected):
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise IncompatibleCheckpoint(
            f"{path}: {what} do not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was it trained on another base model?"
        )
    wrong = [
        f"{k} {tuple(found[k])} vs {tuple(expected[k])}" for k in sorted(found) if tuple(found[k]) != tuple(expected[k])
    ]
    if wrong:
        raise IncompatibleCheckpoint(f"{path}: {what} have other shapes than the model's: {wrong[:3]}")


def weight_files(path: Path, *, lora: bool) -> list[Path]:
    """The trainable-weight files of a checkpoint: the adapter, or the full weights (one file or shards)."""
    path = Path(path)
    if lora:
        return [path / ADAPTER_FILE]
    index = path / f"{FULL_FILE}.index.json"
    if index.exists():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / FULL_FILE]


def add_legacy_rope_keys(config_file: Path) -> None:
    """Copies RoPE settings to the top-level keys mlx-lm reads.

    transformers 5 writes ``rope_theta`` (and any scaling) only inside
    ``rope_parameters``; mlx-lm's Qwen2 / Llama read ``rope_theta`` and
    ``rope_scaling`` and would silently fall back to their defaults (theta 1e6).
    """
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return  # older layout (already top-level) or per-layer-type parameters mlx-lm reads itself
    config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", rope)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
