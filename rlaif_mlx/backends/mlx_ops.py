"""Array-level pieces of the MLX backend: the objective's array namespace, padding and
KV-cache handling for batched sampling, token log-probs, sampling filters, LoRA
layer access, portable-checkpoint tensor copies and gradient clipping.

``backends/mlx.py`` (the ``MlxBackend`` class) is the only user; its PyTorch
twin is ``backends/torch_ops.py``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.tuner.lora import LoRALinear

from rlaif_mlx.backends import portable
from rlaif_mlx.backends.base import SamplingParams, merge_eos_ids

LINEAR = (nn.Linear, nn.QuantizedLinear)  # what LoRA can adapt
BLOCK = 256  # summation block for the gradient norm


class MlxOps:
    """``objective.ArrayOps`` over mlx arrays."""

    exp = staticmethod(mx.exp)
    log = staticmethod(mx.log)
    minimum = staticmethod(mx.minimum)
    maximum = staticmethod(mx.maximum)
    clip = staticmethod(mx.clip)
    where = staticmethod(mx.where)
    sum = staticmethod(mx.sum)
    mean = staticmethod(mx.mean)
    abs = staticmethod(mx.abs)
    stop_gradient = staticmethod(mx.stop_gradient)


def lora_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Per-block module keys (``self_attn.q_proj``) whose last part is a target name."""
    wanted = set(targets)
    keys = []
    for layer in model.layers:
        for name, module in layer.named_modules():
            if name and name.split(".")[-1] in wanted and isinstance(module, LINEAR) and name not in keys:
                keys.append(name)
    if not keys:
        raise ValueError(f"model.lora_target_modules {targets} match no linear layer of the model.")
    return keys


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def renamed(tree, names: dict[str, tuple[str, bool]]) -> dict[str, mx.array]:
    """The tensors of a parameter tree named in ``names`` under their portable names and layouts."""
    flat = dict(tree_flatten(tree))
    return {key: flat[name].T if transposed else flat[name] for name, (key, transposed) in names.items()}


def copy_into(module: nn.Module, names: dict[str, tuple[str, bool]], weights: dict, path: Path, what: str) -> None:
    """Sets a checkpoint's tensors (portable names and layouts) into ``module``, after checking them."""
    current = dict(tree_flatten(module.parameters()))
    expected = {key: tuple(current[name].shape[::-1] if t else current[name].shape) for name, (key, t) in names.items()}
    portable.check_tensors(path, what, {k: v.shape for k, v in weights.items()}, expected)
    update = [(name, (weights[key].T if t else weights[key]).astype(current[name].dtype))
              for name, (key, t) in names.items()]
    module.update(tree_unflatten(update))
    mx.eval(module.parameters())


def lora_delta(module: LoRALinear):
    """The weight-shaped update ``scale * B^T A^T`` an adapter adds (what ``LoRALinear.fuse`` adds)."""
    return (module.scale * module.lora_b.T) @ module.lora_a.T


def eos_ids(tokenizer, path: Path) -> tuple[int, ...]:
    config = path / "generation_config.json"
    generation = json.loads(config.read_text()).get("eos_token_id") if config.exists() else None
    return merge_eos_ids(tokenizer.eos_token_id, generation)


def left_pad(prompts: list[list[int]], *, pad_id: int):
    """``[B, P]`` int32 ids, left-padded, and each row's pad count (``BatchKVCache``'s left_padding)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
    return mx.array(ids), [width - len(p) for p in prompts]


def batch_cache(model, padding: list[int]) -> list:
    """One ``BatchKVCache`` per layer (per-row RoPE offsets and padding masks for a left-padded batch).

    Raises:
        ValueError: the model asks for another cache kind (sliding-window or
            state-space layers), which batched sampling does not handle yet.
    """
    kinds = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in kinds):
        names = sorted({type(c).__name__ for c in kinds})
        raise ValueError(f"batched sampling needs a plain KV cache in every layer, and this model uses {names} "
                         "(sliding-window or state-space layers); use the PyTorch backend for it")
    return [BatchKVCache(padding) for _ in kinds]


def repeat_cache(cache: list, n: int) -> None:
    """Repeats every row of each layer's batch cache ``n`` times (row r -> rows r*n .. r*n+n-1)."""
    if n == 1:
        return
    rows = mx.repeat(mx.arange(cache[0].offset.shape[0]), n)
    for c in cache:
        c.filter(rows)  # mlx-lm's own row selection: keys, values, offsets and padding together


def target_logp(logits, targets):
    """``log_softmax(logits)[target]`` as ``logit - logsumexp``: no full-vocab log-softmax array."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


def token_logp(model, ids, attn):
    """``[N, T-1]`` float32 log-probs of each next token; 0 where the target is padding.

    Rows are right-padded, so the causal mask alone keeps every real token
    from seeing padding (padding only ever follows it); padding positions
    produce garbage that the final ``where`` drops.
    """
    logits = model(ids)
    logp = target_logp(logits[:, :-1].astype(mx.float32), ids[:, 1:])
    return mx.where((attn[:, 1:] * attn[:, :-1]) > 0, logp, mx.zeros_like(logp))


def choose(logits, params: SamplingParams, key):
    """Next tokens ``[R]`` from float32 logits after temperature, top-k, top-p and min-p."""
    if params.temperature <= 1e-6 or params.top_k == 1:
        return mx.argmax(logits, axis=-1)
    logits = logits / params.temperature
    neg_inf = mx.array(-math.inf, dtype=logits.dtype)
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -params.top_k][:, None]
        logits = mx.where(logits < kth, neg_inf, logits)
    if params.top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        outside = (mx.cumsum(probs, axis=-1) - probs) > params.top_p  # the best token always stays
        sorted_logits = mx.where(outside, neg_inf, sorted_logits)
        logits = mx.take_along_axis(sorted_logits, mx.argsort(order, axis=-1), axis=-1)
    if params.min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < params.min_p * probs.max(axis=-1, keepdims=True), neg_inf, logits)
    return mx.random.categorical(logits, axis=-1, key=key)


def clip_grad_norm(grads, max_norm: float):
    """``optim.clip_grad_norm`` with a blockwise sum of squares: returns ``(clipped, pre-clip norm)``.

    ``optim.clip_grad_norm`` sums each gradient's squares in one float32
    reduction, which on the CPU drifts by ~1e-4 relative on a large matrix (the
    embedding); the norm both scales the update and is reported, so sum in
    blocks of 256 instead. Same rule as torch: scale by ``min(max / (norm + 1e-6), 1)``.
    """
    def squared(g):
        x = g.astype(mx.float32).square().reshape(-1)
        while x.size > BLOCK:
            pad = (-x.size) % BLOCK
            if pad:
                x = mx.concatenate([x, mx.zeros((pad,), dtype=x.dtype)])
            x = x.reshape(-1, BLOCK).sum(axis=1)
        return x.sum()

    leaves = [squared(g) for _, g in tree_flatten(grads)]
    norm = mx.sqrt(mx.sum(mx.stack(leaves))) if leaves else mx.array(0.0)
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: (g * scale).astype(g.dtype), grads), norm


def copy_hf_config(source: Path, path: Path, *, dtype: str) -> None:
    """The base folder's config and generation config, describing the plain float weights we write.

    The dtype becomes the weights' and any quantisation entry is dropped
    (checkpoints and exports hold dequantised weights).
    """
    for name in portable.HF_CONFIG_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    config = path / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        for key in ("quantization", "quantization_config"):
            data.pop(key, None)
        for key in ("torch_dtype", "dtype"):
            if key in data or key == "dtype":
                data[key] = dtype
        config.write_text(json.dumps(data, indent=2) + "\n")


def merged_weights(model: nn.Module) -> dict[str, mx.array]:
    """The model's weights as float tensors under Hugging Face names, each adapter folded in.

    Computed into a new dict, so the live model keeps its adapters. mlx-lm's
    parameter names for these models are the Hugging Face names (with LoRA,
    ``<proj>.linear.weight`` -> ``<proj>.weight``); quantised layers are dequantised.
    """
    weights = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{name}.weight"] = mx.dequantize(
                module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                bits=module.bits, mode=module.mode)
            weights.pop(f"{name}.scales")
            weights.pop(f"{name}.biases", None)
    for name, module in lora_layers(model).items():
        del weights[f"{name}.lora_a"], weights[f"{name}.lora_b"]
        for key in [k for k in weights if k.startswith(f"{name}.linear.")]:
            weights[f"{name}.{key.removeprefix(f'{name}.linear.')}"] = weights.pop(key)
        weight = weights[f"{name}.weight"]
        weights[f"{name}.weight"] = weight + lora_delta(module).astype(weight.dtype)
    mx.eval(weights)
    return weights
