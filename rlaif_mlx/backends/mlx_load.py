"""Loading for the MLX backend: the model folder, tokenizer, weights, LoRA adapters, the frozen reference.

``MlxBackend.__init__`` calls ``load_policy`` once. Its PyTorch twin is
``backends/torch_load.py``.

Models come from ``mlx_lm.utils.load_model`` (quantised ones included: LoRA
then trains on the frozen quantised base) and LoRA is mlx-lm's tuner
(``linear_to_lora_layers``); the tokenizer is the Hugging Face tokenizer of the
same folder, as mlx-lm loads it. mlx-lm draws every layer's initial weights
(before the checkpoint's replace them) and LoRA's A matrices from MLX's global
random state: here from the backend's seed, the caller's state put back after.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import snapshot_download
from mlx.utils import tree_map
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, load_model
from transformers import AutoTokenizer

from rlaif_mlx.backends import mlx_ops as ops
from rlaif_mlx.backends.mlx_swiglu import swap_mlps
from rlaif_mlx.config import MlxOptions, ModelConfig

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class Policy:
    """What ``load_policy`` builds.

    Attributes:
        path: the local model folder (the hub snapshot's for a hub id).
        tokenizer: the Hugging Face tokenizer.
        model: the policy, with ``LoRALinear`` layers under LoRA.
        reference: full fine-tune only, a frozen second instance holding the starting weights; None under LoRA.
        eos_ids / pad_id: the tokens that end a completion, and the padding token.
    """

    path: Path
    tokenizer: Any
    model: nn.Module
    reference: nn.Module | None
    eos_ids: tuple[int, ...]
    pad_id: int


def load_policy(config: ModelConfig, *, seed: int, device: str) -> Policy:
    """Loads the tokenizer and model, and adds the LoRA adapters or the reference copy.

    Args:
        config: the ``model`` config section.
        seed: seeds what mlx-lm draws while building (MLX's global state is restored afterwards).
        device: ``"cpu"`` or ``"gpu"``; on the CPU the MLP blocks compute SwiGLU through ``power`` (``mlx_swiglu``).

    Raises:
        ValueError: an architecture batched sampling cannot serve, or a quantised
            base without LoRA (full fine-tuning needs float weights).
    """
    path = model_folder(config.base_model)
    with ops.seeded_rng(seed):
        model = load_base(path, dtype=config.dtype, device=device)
        try:
            ops.batch_cache(model, [0])  # an architecture batched sampling cannot serve fails here, not mid-run
        except ValueError as exc:
            raise ValueError(f"model.base_model {config.base_model!r}: {exc}") from None
        tokenizer = AutoTokenizer.from_pretrained(path)  # the tokenizer mlx-lm's wrapper holds
        eos_ids = ops.eos_ids(tokenizer, path)
        reference = None
        if ops.is_quantized(model) and not config.use_lora:
            raise ValueError(
                f"model.base_model {config.base_model!r} is quantised and full fine-tuning needs float "
                "weights: set model.use_lora: true, or use the unquantised model"
            )
        if config.use_lora:
            model.freeze()
            lora = {
                "rank": config.lora_r,
                "scale": config.lora_alpha / config.lora_r,  # PEFT's alpha / r
                "dropout": config.lora_dropout,
                "keys": ops.lora_keys(model, config.lora_target_modules),
            }
            # Quantised layers stay quantised under their adapters (QLoRA).
            linear_to_lora_layers(model, len(model.layers), lora)
            mx.eval(model.parameters())
        else:
            reference = load_base(path, dtype=config.dtype, device=device)
            reference.update(tree_map(mx.array, model.parameters()))
            reference.freeze()
    pad = tokenizer.pad_token_id
    return Policy(path, tokenizer, model, reference, eos_ids, int(pad if pad is not None else eos_ids[0]))


def model_folder(base: str) -> Path:
    """``base`` as a local folder: itself when it exists, else the Hugging Face hub snapshot of that id.

    The snapshot holds the files mlx-lm reads (``DEFAULT_ALLOW_PATTERNS``); with
    ``HF_HUB_OFFLINE=1`` it is found in the local cache without the network.
    """
    path = Path(base)
    if path.exists():
        return path
    return Path(snapshot_download(base, allow_patterns=DEFAULT_ALLOW_PATTERNS))


def load_base(path: Path, *, dtype: str, device: str) -> nn.Module:
    """The model in ``path`` as mlx-lm builds it, in ``dtype``, evaluated, in eval mode.

    On the CPU its known MLP blocks are swapped for ``PowerSwiGLU`` (same parameters, same function, ~3x faster there).
    """
    model, _ = load_model(path)
    if device == "cpu":
        swap_mlps(model)
    model.set_dtype(DTYPES[dtype])
    model.eval()
    mx.eval(model.parameters())
    return model


def set_memory_limits(options: MlxOptions, *, device: str) -> None:
    """Applies ``model.mlx.memory_limit_gb`` / ``cache_limit_gb`` (process-wide MLX settings the config asks for)."""
    if options.memory_limit_gb is not None:
        limit = int(options.memory_limit_gb * 1024**3)
        mx.set_memory_limit(limit)
        if device == "gpu":  # wired memory exists on Metal only
            with contextlib.suppress(ValueError):  # Metal refuses a wired limit above its recommended working set
                mx.set_wired_limit(limit)
    if options.cache_limit_gb is not None:
        mx.set_cache_limit(int(options.cache_limit_gb * 1024**3))
