"""Loading for the PyTorch backend: tokenizer, weights, LoRA adapters, the frozen reference, sharding.

``TorchBackend.__init__`` calls ``load_policy`` once; ``export`` calls
``load_base`` for a fresh CPU copy to merge into. Its MLX twin is
``backends/mlx_load.py``.

Nothing here changes state the caller owns: transformers' progress bars are
switched off only while a model loads, and the random draws of LoRA's
initialisation come from the backend's seed, with torch's global generators
put back afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from huggingface_hub import utils as hub_utils
from peft import LoraConfig as PeftLoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """What ``load_policy`` builds.

    Attributes:
        tokenizer: the Hugging Face tokenizer.
        model: the policy, a PEFT model under LoRA (sharded under FSDP).
        reference: full fine-tune only, a frozen copy of the starting weights; None under LoRA.
        eos_ids / pad_id: the tokens that end a completion, and the padding token.
        cache_arg: the keyword under which the model's forward takes a KV cache.
        fsdp: the ``torch_fsdp`` module when the weights are sharded, else None.
    """

    tokenizer: Any
    model: torch.nn.Module
    reference: torch.nn.Module | None
    eos_ids: tuple[int, ...]
    pad_id: int
    cache_arg: str
    fsdp: ModuleType | None


def load_policy(config: ModelConfig, *, device: str, seed: int) -> Policy:
    """Loads the tokenizer and model, adds the LoRA adapters or the reference copy, and shards when asked.

    Args:
        config: the ``model`` config section.
        device: where the weights live (``ops.resolve_device``'s answer).
        seed: seeds LoRA's initialisation (torch's global generators are restored afterwards).

    Raises:
        ValueError: a base model quantised for MLX.
    """
    base = config.base_model
    ops.refuse_mlx_quantized(base)
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(base)
    fsdp = ops.sharding(config.torch.fsdp)
    reference = None
    with ops.seeded_rng(seed, device=device):  # LoRA's initial A matrices (and anything loading draws)
        model = load_base(config, device=device)
        cache_arg = ops.cache_kwarg(model.forward)
        eos_ids = ops.eos_ids(tokenizer, model)
        if config.use_lora:
            lora = PeftLoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_target_modules),
                task_type="CAUSAL_LM",
            )
            model = ops.with_lora(model, lora)
        else:
            reference = copy.deepcopy(model).eval()  # copied whole, before sharding
            reference.requires_grad_(False)
    if fsdp is not None:  # after LoRA (adapters shard with their layer), before the optimizer
        model = fsdp.shard(model)
        if reference is not None:  # a whole copy in every process would undo what sharding saves
            reference = fsdp.shard(reference)
    pad = tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else eos_ids[0])
    return Policy(tokenizer, model, reference, eos_ids, pad_id, cache_arg, fsdp)


def load_base(config: ModelConfig, *, device: str):
    """The base model as transformers loads it, in the configured dtype and attention kernel, on ``device``."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[config.dtype]}
    if config.torch.attn_implementation:
        kwargs["attn_implementation"] = config.torch.attn_implementation
    with quiet_loading():
        return AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs).to(device)


@contextlib.contextmanager
def quiet_loading():
    """transformers' and the hub's progress bars off for the block, then as they were.

    Per-file progress bars would drown the one-line-per-step log; the caller's own
    loads outside a backend keep whatever setting the caller chose.
    """
    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' and the hub's
    try:
        yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
        (hub_utils.disable_progress_bars if hub_bars_off else hub_utils.enable_progress_bars)()
