"""Array-level pieces of the PyTorch backend: the objective's array namespace, device
choice (and FSDP's), the backend's own random draws, padding for batched sampling,
token log-probs, sampling filters and the batched draw, LoRA layer access (folding
for decoding, a fresh adapter after a rebase), tensors to numpy and the gradient
all-reduce under torchrun.

``backends/torch.py`` (the ``TorchBackend`` class) and its ``torch_*`` helpers
are the only users; its MLX twin is ``backends/mlx_ops.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from rlaif_mlx.backends.base import GREEDY_TEMPERATURE, SamplingParams
from rlaif_mlx.backends.common import merge_eos_ids

ADAPTER = "default"  # PEFT's name for the one adapter we train

log = logging.getLogger(__name__)


class TorchOps:
    """``objective.ArrayOps`` over torch tensors; ``stop_gradient`` is ``detach``."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    minimum = staticmethod(torch.minimum)
    maximum = staticmethod(torch.maximum)
    clip = staticmethod(torch.clamp)
    where = staticmethod(torch.where)
    sum = staticmethod(torch.sum)
    mean = staticmethod(torch.mean)
    abs = staticmethod(torch.abs)
    stop_gradient = staticmethod(torch.Tensor.detach)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.torch.device is {requested!r} but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'.")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("model.torch.device is 'mps' but this PyTorch build has no MPS support; use 'auto' or 'cpu'.")
    return str(torch.device(requested))


def several_processes() -> bool:
    """Whether torchrun started this process among others (an initialised process group of more than one)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sharding(wanted: bool):
    """The ``torch_fsdp`` module when ``model.torch.fsdp`` asks for it and several processes share the run.

    In one process there is nothing to shard over: the run goes on with the
    whole model, and says so (a config written for a GPU server still runs on
    a laptop). Imported only here: ``torch.distributed.fsdp`` is not free.
    """
    if not wanted:
        return None
    if not several_processes():
        log.warning(
            "model.torch.fsdp shards the weights over the processes torchrun starts; this run has one "
            "process, which holds the whole model."
        )
        return None
    from rlaif_mlx.backends import torch_fsdp

    return torch_fsdp


@contextlib.contextmanager
def seeded_rng(seed: int, *, device: str):
    """torch's global generators (the CPU's and ``device``'s) seeded with ``seed`` for the block, restored after.

    For the draws that take no generator argument: PEFT's LoRA initialisation and
    dropout. The caller's random state is the same after the block as before it.
    """
    where = torch.device(device)
    accelerators = [where] if where.type != "cpu" else []
    with torch.random.fork_rng(devices=accelerators, device_type=where.type if accelerators else None):
        torch.random.default_generator.manual_seed(seed)
        if where.type == "cuda":
            with torch.cuda.device(where):
                torch.cuda.manual_seed(seed)
        elif accelerators:
            getattr(torch, where.type).manual_seed(seed)
        yield


def to_numpy(tensor: torch.Tensor):
    """A CPU numpy copy; floating point as float32 (numpy has no bfloat16)."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy().copy()


def refuse_mlx_quantized(base: str) -> None:
    """transformers cannot read mlx-lm's quantised weights; say so before it fails obscurely."""
    config = Path(base) / "config.json"
    if config.is_file() and "quantization" in json.loads(config.read_text()):
        raise ValueError(
            f"model.base_model {base!r} is quantised for MLX (config.json has 'quantization'); "
            "the PyTorch backend needs the unquantised model, e.g. the original Hugging Face repo"
        )


def lora_layers(model) -> dict[str, Any]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


@contextlib.contextmanager
def lora_merged(peft_model):
    """For the block, each adapter folded into its base layer's weight and the adapters switched off.

    Decoding then runs one matmul per projection and no PEFT dispatch per layer and
    step. The original weight tensors are put back untouched afterwards, even on an
    error: bit for bit, which subtracting the delta again would not be. Adapters that
    do not fold into one weight (DoRA, LoRA bias, a tied embedding) are left as they are.
    """
    layers = list(lora_layers(peft_model).values())
    tied = peft_model.get_input_embeddings().weight
    unfoldable = (m.use_dora.get(ADAPTER) or getattr(m, "lora_bias", {}).get(ADAPTER) for m in layers)  # peft < 0.14
    if any(unfoldable) or any(m.get_base_layer().weight is tied for m in layers):
        yield
        return
    swapped = []
    try:
        with torch.no_grad():
            for module in layers:
                base = module.get_base_layer()
                original = base.weight.data
                base.weight.data = original + module.get_delta_weight(ADAPTER).to(original.dtype)
                swapped.append((base, original))
        with peft_model.disable_adapter():
            yield
    finally:
        for base, original in swapped:
            base.weight.data = original


def reset_adapter(module, *, fill=None) -> None:
    """Starts a LoRA layer's adapter afresh: A drawn anew, B = 0 (so it adds nothing yet).

    Args:
        module: a PEFT LoRA layer.
        fill: ``torch_fsdp.fill`` when the model is sharded: A is drawn whole,
            as one process draws it, and each process keeps its shard. None:
            PEFT's own ``reset_lora_parameters`` (the same draws, in place).
    """
    if fill is None:
        module.reset_lora_parameters(ADAPTER, True)
        return
    # PEFT's init_lora_weights=True: A as nn.Linear's default (Kaiming uniform, a = sqrt(5)), B zero
    fill(module.lora_A[ADAPTER].weight, lambda weight: torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5)))
    fill(module.lora_B[ADAPTER].weight, torch.nn.init.zeros_)


def with_lora(model, config: PeftLoraConfig):
    with warnings.catch_warnings():  # peft probes an attribute transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def eos_ids(tokenizer, model) -> tuple[int, ...]:
    generation = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return merge_eos_ids(tokenizer.eos_token_id, generation)


def left_pad(prompts: list[list[int]], *, pad_id: int, device: str):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def cache_kwarg(forward) -> str:
    """The name under which ``forward`` takes a KV cache: transformers 5 renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a cached forward returned, under either name."""
    return out.get("cache") if out.get("cache") is not None else out.past_key_values


def generators(seed: int | tuple[int, ...], *, prompts: int, device: str) -> list:
    """The generators of one sampling call, on ``device`` where it has its own (else on the CPU).

    An int seeds one generator for the call; a tuple holds one seed per prompt,
    each seeding its prompt's generator (``choose`` splits the rows among them).

    Raises:
        ValueError: a tuple whose length is not the number of prompts.
    """
    if isinstance(seed, tuple) and len(seed) != prompts:
        raise ValueError(f"params.seed holds {len(seed)} seeds for {prompts} prompts; give one per prompt.")
    seeds = seed if isinstance(seed, tuple) else (seed,)
    try:
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]
    except RuntimeError:  # devices without their own generator sample on the CPU
        return [torch.Generator().manual_seed(s) for s in seeds]


def target_logp(logits, targets, temperature: float = 1.0):
    """``log_softmax(logits / temperature)[target]`` as ``logit - logsumexp``: no full-vocab log-softmax tensor.

    The one place a log-prob's temperature is applied: sampling, teacher-forced scoring and
    training all divide the same float32 logits the same way, so they give the same numbers.
    """
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logp(model, ids, attn, temperature: float = 1.0):
    """``[N, T-1]`` float32 log-probs of each next token at ``temperature``; 0 where the target is padding."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logp = target_logp(logits[:, :-1].float(), ids[:, 1:], temperature)
    return torch.where((attn[:, 1:] * attn[:, :-1]).bool(), logp, torch.zeros_like(logp))


def choose(logits, params: SamplingParams, generators: list):
    """Next tokens ``[R]`` from float32 logits after temperature, top-k, top-p and min-p.

    One inverse-CDF draw for all rows (one ``searchsorted``, not a ``multinomial``
    per prompt); a token of probability 0 is never drawn. Rows are prompt-major and
    split evenly among ``generators``: each draws its own rows' uniforms, so with
    one generator per prompt a prompt's samples do not depend on the other prompts
    in the call.
    """
    if params.temperature <= GREEDY_TEMPERATURE or params.top_k == 1:
        return logits.argmax(dim=-1)
    cdf = filter_logits(logits, params).softmax(dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    per = logits.shape[0] // len(generators)
    u = torch.cat([torch.rand(per, generator=g, device=g.device) for g in generators]).to(cdf.device)
    # Kept below the total, the first CDF entry above the threshold has mass > 0: a filtered-out token
    # (probability exactly 0) is never picked, even where u * total would reach the total (u = 1).
    threshold = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, threshold, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def filter_logits(logits, params: SamplingParams):
    """Logits over the temperature, with tokens outside top-k / top-p / min-p at the dtype's minimum."""
    logits = logits / params.temperature
    neg_inf = torch.finfo(logits.dtype).min
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = (probs.cumsum(dim=-1) - probs) > params.top_p  # the best token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, neg_inf))
    if params.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), neg_inf)
    return logits


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The policy's weights with each adapter folded into its base layer, on the CPU, under HF names."""
    base = peft_model.get_base_model()
    merged = {
        name.replace(".base_layer.", "."): tensor.detach().to("cpu", copy=True)
        for name, tensor in base.state_dict().items()
        if "lora_" not in name
    }
    for name, module in lora_layers(base).items():
        key = f"{name}.weight"
        merged[key] += module.get_delta_weight(ADAPTER).to("cpu", merged[key].dtype)
    return merged


@torch.no_grad()
def all_reduce_gradients(params: list) -> None:
    """Sums the parameters' gradients over the torchrun processes, in place, in a few flat all-reduce calls."""
    for p in params:
        if p.grad is None:  # a share with no rows still joins the sum
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch.distributed.all_reduce(flat)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
            g.copy_(part.view_as(g))


def _buckets(tensors: list, max_elements: int = 1 << 25) -> list[list]:
    """Consecutive tensors of one dtype grouped up to ``max_elements``: few all-reduce calls, bounded extra memory."""
    buckets: list[list] = []
    size = 0
    for t in tensors:
        if not buckets or size + t.numel() > max_elements or buckets[-1][0].dtype != t.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel()
    return buckets
