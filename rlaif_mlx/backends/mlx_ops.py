"""Array-level pieces of the MLX backend: the objective's array namespace, padding and
KV-cache handling for batched sampling, the last-position LM head, token
log-probs, the one-pass sampling draw and its filters, LoRA layer access and
merging, gradient clipping, the backend's own random draws and arrays to numpy.

``exp`` over the vocabulary goes through ``power`` (``exp_floored``): MLX's CPU
``exp`` is ~4x slower, and the vocabulary-wide passes (sampling, log-softmax
normalisers) are a large part of the CPU's time on small models.

``backends/mlx.py`` (the ``MlxBackend`` class) and its ``mlx_*`` helpers are
the only users; its PyTorch twin is ``backends/torch_ops.py``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.tuner.lora import LoRALinear

from rlaif_mlx.backends.base import GREEDY_TEMPERATURE, SamplingParams
from rlaif_mlx.backends.common import merge_eos_ids

LINEAR = (nn.Linear, nn.QuantizedLinear)  # what LoRA can adapt
BLOCK = 256  # summation block for the gradient norm
LOG2E = 1.4426950408889634
EXP_FLOOR = -126.0 / LOG2E  # ln(2 ** -126)


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


@contextlib.contextmanager
def seeded_rng(seed: int):
    """MLX's global random state seeded with ``seed`` for the block, the caller's state restored after.

    For the draws that take no key: mlx-lm building a model (its layers' random
    initialisation), LoRA adapters, dropout. MLX splits the key when an op is
    created, not when it is evaluated, so the block's ops keep the block's keys.
    """
    high, low = (int(half) for half in np.array(mx.random.state[0]))
    mx.random.seed(seed)
    try:
        yield
    finally:
        mx.random.seed((high << 32) | low)  # a key is its seed's two 32-bit halves: this sets it back exactly


def to_numpy(array) -> np.ndarray:
    """A numpy copy; floating point as float32 (numpy has no bfloat16), packed quantised weights as they are."""
    return np.array(array.astype(mx.float32) if mx.issubdtype(array.dtype, mx.floating) else array)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_delta(module: LoRALinear):
    """The weight-shaped update ``scale * B^T A^T`` an adapter adds (what ``LoRALinear.fuse`` adds)."""
    return (module.scale * module.lora_b.T) @ module.lora_a.T


@contextlib.contextmanager
def lora_merged(model: nn.Module):
    """For the block, each adapted float layer is a plain ``Linear`` holding ``W + scale B^T A^T``.

    A decode step then runs one matmul per layer instead of three plus an add.
    The ``LoRALinear`` modules are put back afterwards, untouched (bit-identical),
    exception or not. Quantised bases stay as they are: folding an update into
    them would re-quantise.
    """
    layers = lora_layers(model)
    if any(type(m.linear) is not nn.Linear for m in layers.values()):
        layers = {}
    merged = {}
    with seeded_rng(0):  # the shells' random 1x1 starts (replaced next) leave the caller's random state alone
        for name, module in layers.items():
            linear = nn.Linear(1, 1, bias=False)  # a shell: its weights are set next
            linear.weight = module.linear.weight + lora_delta(module).astype(module.linear.weight.dtype)
            if "bias" in module.linear:
                linear.bias = module.linear.bias
            merged[name] = linear
    mx.eval(merged)
    try:
        for name, linear in merged.items():
            _set_module(model, name, linear)
        yield
    finally:
        for name, module in layers.items():
            _set_module(model, name, module)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    *path, last = name.split(".")
    parent = root
    for part in path:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    parent[last] = module


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


def batch_cache(model, padding: list[int], *, capacity: int | None = None) -> list:
    """One ``BatchKVCache`` per layer (per-row RoPE offsets and padding masks for a left-padded batch).

    Args:
        capacity: positions the call will hold (prompt + new tokens): the cache is
            allocated once at that length instead of in mlx-lm's blocks of 256
            (a 16-row decode of ~90 positions otherwise holds 3x the keys it needs).
            It still grows, in blocks of ``capacity``, should a call need more.

    Raises:
        ValueError: the model asks for another cache kind (sliding-window or
            state-space layers), which batched sampling does not handle yet.
    """
    kinds = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in kinds):
        names = sorted({type(c).__name__ for c in kinds})
        raise ValueError(
            f"batched sampling needs a plain KV cache in every layer, and this model uses {names} "
            "(sliding-window or state-space layers); use the PyTorch backend for it"
        )
    caches = [BatchKVCache(padding) for _ in kinds]
    if capacity is not None:
        for cache in caches:
            cache.step = max(int(capacity), 1)  # read by update_and_fetch when it allocates
    return caches


def repeat_cache(cache: list, n: int) -> None:
    """Repeats every row of each layer's batch cache ``n`` times (row r -> rows r*n .. r*n+n-1)."""
    if n > 1:
        select_cache_rows(cache, mx.repeat(mx.arange(cache[0].offset.shape[0]), n))


def select_cache_rows(cache: list, rows) -> None:
    """Keeps rows ``rows`` (an int array; a row may repeat) of each layer's batch cache, in that order."""
    for c in cache:
        c.filter(rows)  # mlx-lm's own row selection: keys, values, offsets and padding together


# mlx-lm model files whose ``Model.__call__`` is exactly ``head(self.model(ids, cache))``, the head being
# ``lm_head`` or the tied ``embed_tokens.as_linear`` (quantised or not). Others keep the full call.
_BODY_THEN_HEAD = frozenset({"llama", "qwen2", "qwen3", "phi3", "starcoder2", "olmo2"})


def lm_head(model):
    """The model's LM head as a callable on hidden states, or None for a layout not known to be body-then-head.

    Looked up at each call: a rebase or a LoRA merge may swap modules.
    """
    if type(model).__module__.rpartition(".")[2] not in _BODY_THEN_HEAD or "model" not in model:
        return None
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", None)
    if tied is True and hasattr(model.model, "embed_tokens"):
        return model.model.embed_tokens.as_linear
    if tied is False and "lm_head" in model:
        return model.lm_head
    return None


def last_logits(model, ids, cache):
    """Logits ``[B, V]`` of the last position, the LM head applied to that position only where the layout allows.

    A prefill of ``P`` positions otherwise computes (and allocates) ``P x V`` logits to keep one row of them.
    """
    head = lm_head(model)
    if head is None:
        return model(ids, cache=cache)[:, -1, :]
    return head(model.model(ids, cache)[:, -1:, :])[:, 0, :]


def exp_floored(x):
    """``exp(x)`` for ``x <= 0`` as ``2 ** (x log2 e)``, floored at ``2 ** -126`` (~1e-38).

    MLX's CPU ``exp`` costs ~4x its ``power`` (float32 ``[64, 8192]``: 10 ms vs
    2.4 ms); on Metal both are cheap. The floor keeps ``power`` off its slow
    denormal path.
    """
    return mx.power(2.0, mx.maximum(x * LOG2E, -126.0))


def exp_nonpositive(x):
    """``exp_floored``, but exactly 0 where it floors (``-inf`` included), so a filtered token weighs 0."""
    return exp_floored(x) * (x > EXP_FLOOR)


def target_logp(logits, targets, temperature: float = 1.0):
    """``log_softmax(logits / temperature)[target]`` as ``logit - logsumexp``: no full-vocab log-softmax array.

    Teacher-forced scoring and training divide the float32 logits as ``choose`` does, so a
    sample's recorded log-prob and its teacher-forced one agree.
    """
    if temperature != 1.0:
        logits = logits / temperature
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - logsumexp(logits)


@mx.custom_function
def logsumexp(logits):
    """``mx.logsumexp`` over the last axis with ``exp_floored``; within ~1 ulp of it.

    On the CPU ~30% faster, ~40% with the gradient (written out below: the
    softmax, one more pass, where autodiff through the floor takes several).
    Terms under ``1e-38`` of the largest count as ``1e-38``: immaterial to a sum.
    """
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    return (top + mx.log(exp_floored(logits - top).sum(axis=-1, keepdims=True))).squeeze(-1)


@logsumexp.vjp
def _logsumexp_vjp(logits, cotangent, output):
    return exp_floored(logits - output[..., None]) * cotangent[..., None]


def token_logp(model, ids, attn, temperature: float = 1.0):
    """``[N, T-1]`` float32 log-probs of each next token at ``temperature``; 0 where the target is padding.

    Rows are right-padded, so the causal mask alone keeps every real token
    from seeing padding (padding only ever follows it); padding positions
    produce garbage that the final ``where`` drops.
    """
    logits = model(ids)
    logp = target_logp(logits[:, :-1].astype(mx.float32), ids[:, 1:], temperature)
    return mx.where((attn[:, 1:] * attn[:, :-1]) > 0, logp, mx.zeros_like(logp))


def sampling_uniforms(seed: int | tuple[int, ...], *, prompts: int, steps: int, rows: int):
    """``[steps, rows]`` uniforms in [0, 1) for the inverse-CDF draws of one sampling call.

    An int seeds the whole call; a tuple holds one seed per prompt, each seeding
    the stream of its prompt's ``rows / prompts`` rows, so a prompt's draws do
    not depend on which other prompts share the call (nor on the vocabulary or
    the filters).

    Raises:
        ValueError: a tuple whose length is not the number of prompts.
    """
    if isinstance(seed, tuple) and len(seed) != prompts:
        raise ValueError(f"params.seed holds {len(seed)} seeds for {prompts} prompts; give one per prompt.")
    seeds = seed if isinstance(seed, tuple) else (seed,)
    per_key = rows // len(seeds)
    return mx.concatenate([mx.random.uniform(shape=(steps, per_key), key=mx.random.key(s)) for s in seeds], axis=1)


def choose(logits, params: SamplingParams, u):
    """Next tokens ``[R]`` (int32) and their log-probs ``[R]`` from float32 logits ``[R, V]``.

    Inverse CDF over ``w = exp(scaled - max)``, ``scaled = logits / T``, after top-k,
    top-p and min-p: the token is the first whose cumulative weight exceeds
    ``u * sum(w)`` (``u [R]`` uniforms in [0, 1)), so a filtered (zero-weight)
    token is never drawn. The log-prob is of the tempered, untruncated policy (the
    one that is trained): the same ``w`` before the filters gives its normaliser, one
    ``exp`` pass over the vocabulary, where a Gumbel draw plus a ``logsumexp`` made
    several. ``temperature == 0`` or ``top_k == 1`` is greedy; temperature 0 records
    temperature-1 log-probs (``SamplingParams.logprob_temperature``).
    """
    vocab = logits.shape[-1]
    best = mx.argmax(logits, axis=-1)
    t = params.logprob_temperature
    scaled = logits if t == 1.0 else logits / t  # as ``target_logp`` scales them
    # scaled[best] is the maximum exactly (rounding is monotone), so max(w) == 1: min-p needs no softmax
    top = mx.take_along_axis(scaled, best[:, None], axis=-1)  # [R, 1]
    weights = exp_nonpositive(scaled - top)  # the tempered, untruncated weights: the log-prob's normaliser
    log_z = top.squeeze(-1) + mx.log(weights.sum(axis=-1))
    if params.temperature <= GREEDY_TEMPERATURE or params.top_k == 1:
        return best.astype(mx.int32), top.squeeze(-1) - log_z
    # Filters multiply by a mask (MLX's CPU ``where`` costs ~30x a multiply).
    if 0 < params.top_k < vocab:
        kth = -mx.partition(-weights, params.top_k - 1, axis=-1)[:, params.top_k - 1 : params.top_k]
        weights = weights * (weights >= kth)
    if params.top_p < 1.0:
        ordered = -mx.sort(-weights, axis=-1)  # descending
        cum = mx.cumsum(ordered, axis=-1)
        kept = ((cum - ordered) <= params.top_p * cum[:, -1:]).sum(axis=-1, keepdims=True)  # >= 1: the best stays
        weights = weights * (weights >= mx.take_along_axis(ordered, kept - 1, axis=-1))
    if params.min_p > 0.0:
        weights = weights * (weights >= params.min_p)
    cdf = mx.cumsum(weights, axis=-1)
    token = mx.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1), vocab - 1)
    # A zero-weight token can only come from float rounding at the top end: take the best token there.
    token = mx.where(mx.take_along_axis(weights, token[:, None], axis=-1).squeeze(-1) > 0, token, best)
    token = token.astype(mx.int32)
    return token, mx.take_along_axis(scaled, token[:, None], axis=-1).squeeze(-1) - log_z


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
                module.weight,
                module.scales,
                module.get("biases"),
                group_size=module.group_size,
                bits=module.bits,
                mode=module.mode,
            )
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
