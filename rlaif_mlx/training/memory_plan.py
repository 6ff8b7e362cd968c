"""How much memory a run needs, phase by phase, from the model's shape and the config: pure arithmetic.

One RL step holds, all the time, the *resident* part: the weights (quantised
ones at their bits per weight), a frozen reference copy for a full fine-tune
(LoRA switches its adapters off instead), and AdamW's two moments per trainable
weight. On top of it each phase needs its own working memory:

- **sampling**: the KV cache of every row (``batch_size x num_samples_per_prompt``
  rows of prompt + new tokens, as the backend allocates it), the prompts' own
  cache while it is repeated per sample, the LoRA adapters folded into a copy of
  the layers they adapt, and a prefill's activations;
- **reference**: log-probs of the rollout under the frozen reference, one micro-batch
  of ``training.micro_batch_size`` rows at a time: its KV cache and hidden states,
  and the logits the LM head turns into log-probs (MLX: the whole micro-batch's
  logits; PyTorch: chunks of at most ``HEAD_CHUNK_ELEMENTS``);
- **update**: the same forward with every layer's activations kept for the
  backward pass, the logits and their gradient, the gradients (accumulated over
  micro-batches), and the optimizer's new moments while AdamW writes them.

Each part follows what the backends' code allocates (block sizes, which logits
live when, which copies a pass makes); the few factors that depend on the
frameworks' internals (the copy factors below) were set from peaks measured on
the tiny and a 30M model on one workload and then checked on another
(``benchmarks/bench_memory.py``, ``docs/memory.md``; the tiny model is held to
25 % by ``tests/training/test_memory_plan.py``). The plan counts arrays, not the
interpreter. Not planned: the supervised warm-up (its rows, prompt + reference
solution, are usually shorter than a sampled row) and periodic evaluation
(sampling with ``eval.num_samples``, usually fewer rows than training's).

No framework is imported here: ``training/memory_fit.py`` feeds it a config and
the device's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

GB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEAD_CHUNK_ELEMENTS = 1 << 25  # backends/torch_forward.py: logits per LM-head chunk
# Float32 copies of a micro-batch's [rows, positions, vocab] logits alive at once: the reference pass keeps
# the logits and part of the log-sum-exp's pass; training keeps them for the backward pass, which adds
# their gradient and the log-sum-exp's. MLX holds the whole micro-batch's logits, PyTorch one chunk.
LOGIT_COPIES = {"reference": {"mlx": 2.0, "torch": 1.2}, "update": {"mlx": 4.0, "torch": 4.0}}
# Activations per token and layer kept for the backward pass, in (hidden, intermediate) elements: the
# norms' and projections' inputs, q/k/v and the attention output; the MLP's gate, up and their product.
# PyTorch's RMSNorm keeps float32 intermediates of its own, hence more hidden-sized ones.
ACTIVATIONS = {"mlx": (6.0, 3.5), "torch": (8.0, 2.8)}
# Gradients beside the resident part while training: MLX holds the running sum and a micro-batch's
# (then AdamW's new arrays, up to 3x); PyTorch accumulates into .grad in place, plus a parameter's worth.
GRADIENT_COPIES = {"mlx": 2.0, "torch": 1.5}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer's ``config.json`` the plan needs.

    Attributes:
        quant_bits: bits per quantised weight (mlx-community's ``quantization.bits``), None for float weights.
        quant_group: weights per quantisation group (each group keeps a scale and a bias).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    quant_bits: int | None = None
    quant_group: int = 64

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a Hugging Face / mlx-lm ``config.json`` (``quantization`` as mlx-lm writes it).

        Raises:
            ValueError: a key the plan needs is missing.
        """
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            quant = config.get("quantization") or config.get("quantization_config") or {}
            return cls(
                hidden_size=hidden,
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
                quant_bits=int(quant["bits"]) if quant.get("bits") else None,
                quant_group=int(quant.get("group_size") or 64),
            )
        except KeyError as exc:
            raise ValueError(f"config.json has no {exc.args[0]!r}, which the memory plan needs") from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each layer's projections: name -> (inputs, outputs)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameter_count(self) -> int:
        """Weights of the model (a tied LM head counted once)."""
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden_size
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    def weight_bytes(self, dtype_bytes: int) -> int:
        """The weights in memory: float at ``dtype_bytes``, or quantised matrices with a scale and bias per group."""
        total = self.parameter_count() * dtype_bytes
        if self.quant_bits is None:
            return total
        matrices = self.num_layers * sum(a * b for a, b in self.linears().values())
        matrices += self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        quantised = matrices * self.quant_bits / 8 + 2 * (matrices / self.quant_group) * dtype_bytes
        return int(total - matrices * dtype_bytes + quantised)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one position in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Workload:
    """What one process of a run does in a step.

    Attributes:
        backend: ``mlx`` or ``torch``.
        dtype: the weights' dtype (``model.dtype``).
        prompts: this process's prompts per step (``training.batch_size`` / processes).
        prompt_tokens: the longest prompt (``data.max_prompt_tokens`` when not known better).
    """

    backend: str
    dtype: str
    use_lora: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    prompts: int
    samples_per_prompt: int
    prompt_tokens: int
    new_tokens: int
    micro_batch_size: int


@dataclass(frozen=True)
class Phase:
    """One phase's peak: the resident part plus its own working memory.

    Attributes:
        name: ``sampling``, ``reference`` or ``update``.
        parts: what makes up the peak, bytes per part (the resident parts included).
        lower: the config setting that shrinks this phase's own working memory.
    """

    name: str
    parts: dict[str, int] = field(default_factory=dict)
    lower: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class MemoryPlan:
    """The resident part and the three phases of a step."""

    resident: dict[str, int]
    phases: tuple[Phase, ...]

    @property
    def peak(self) -> Phase:
        """The phase that needs the most."""
        return max(self.phases, key=lambda p: p.total)

    def over(self, budget: int) -> Phase | None:
        """The first phase (in step order) that needs more than ``budget`` bytes, or None when all fit."""
        return next((p for p in self.phases if p.total > budget), None)


def plan(shape: ModelShape, work: Workload) -> MemoryPlan:
    """The resident memory and each phase's peak for one process running ``work`` on a model of ``shape``."""
    b = DTYPE_BYTES[work.dtype]
    weights = shape.weight_bytes(b)
    adapters = _adapter_parameters(shape, work) * 4  # float32 (mlx-lm's and PEFT's adapters)
    trainable = adapters if work.use_lora else shape.parameter_count() * b
    resident = {"weights": weights}
    if work.use_lora:
        resident["LoRA adapters"] = adapters
    else:
        resident["reference copy"] = weights
    resident["optimizer state"] = 2 * trainable
    phases = (
        Phase("sampling", resident | _sampling(shape, work, b), "training.batch_size or rlaif.max_new_tokens"),
        Phase("reference", resident | _forward(shape, work, b, train=False), "training.micro_batch_size"),
        Phase(
            "update", resident | _forward(shape, work, b, train=True, trainable=trainable), "training.micro_batch_size"
        ),
    )
    return MemoryPlan(resident, phases)


def largest_micro_batch(shape: ModelShape, work: Workload, budget: int) -> int | None:
    """The largest ``training.micro_batch_size`` (at most the rows of a step) whose plan fits ``budget``; None if
    not even 1 does (or sampling, which does not depend on it, does not fit)."""
    rows = work.prompts * work.samples_per_prompt
    best = None
    for size in range(1, rows + 1):
        if plan(shape, replace(work, micro_batch_size=size)).over(budget) is None:
            best = size
    return best


# ---- the phases' own working memory ------------------------------------------------------


def _sampling(shape: ModelShape, work: Workload, b: int) -> dict[str, int]:
    rows = work.prompts * work.samples_per_prompt
    total = work.prompt_tokens + work.new_tokens
    per_token = shape.kv_bytes_per_token(b)
    if work.backend == "mlx":  # allocated for the call (prompt + new tokens), then repeated per sample
        parts = {"KV cache": rows * total * per_token}
    else:  # preallocated for the call, filled from the prompts' own cache
        parts = {"KV cache": (rows * total + work.prompts * work.prompt_tokens) * per_token}
    if work.use_lora and shape.quant_bits is None:  # adapters folded into a copy of the layers they adapt
        folded = sum(a * c for name, (a, c) in shape.linears().items() if name in work.lora_targets)
        parts["LoRA folded into weights"] = shape.num_layers * folded * b
    if work.backend == "mlx":  # the prefill's layer activations stay until the decode starts
        prefill = work.prompts * work.prompt_tokens
        parts["activations"] = prefill * 2 * (shape.hidden_size + shape.intermediate_size) * b
    parts["logits"] = 2 * rows * shape.vocab_size * 4  # the sampler's passes over each row's vocabulary
    return parts


def _forward(shape: ModelShape, work: Workload, b: int, *, train: bool, trainable: int = 0) -> dict[str, int]:
    """One micro-batch's teacher-forced forward (and with ``train``, its backward and the optimizer step)."""
    rows = min(work.micro_batch_size, work.prompts * work.samples_per_prompt)
    unique = min(math.ceil(rows / work.samples_per_prompt), rows)  # each prompt forwarded once
    total = work.prompt_tokens + work.new_tokens
    mlx = work.backend == "mlx"
    parts = {"KV cache": rows * total * shape.kv_bytes_per_token(b)}  # MLX: sized to the micro-batch too
    tokens = unique * work.prompt_tokens + rows * work.new_tokens  # positions the layers run on
    h, i = shape.hidden_size, shape.intermediate_size
    if train:
        per_h, per_i = ACTIVATIONS[work.backend]
        parts["activations"] = int(shape.num_layers * tokens * (per_h * h + per_i * i) * b)
    else:  # one layer at a time
        parts["activations"] = tokens * 2 * (h + i) * b
    if mlx:  # MLX's attention on the CPU materialises the scores (recomputed in the backward pass)
        parts["attention scores"] = rows * shape.num_heads * work.new_tokens * total * 4 * (2 if train else 1)
    scored = rows * work.new_tokens  # the positions whose next token is scored: the completions' (the reference too)
    if not mlx and not train:  # measured: PyTorch's reference peak did not fall when the prompts' targets went
        scored += unique * work.prompt_tokens
    if not mlx:  # the LM head runs in chunks (recomputed in the backward pass)
        scored = min(scored, max(1, HEAD_CHUNK_ELEMENTS // shape.vocab_size))
    copies = LOGIT_COPIES["update" if train else "reference"][work.backend] + (0.5 if b < 4 else 0.0)
    parts["logits"] = int(copies * scored * shape.vocab_size * 4)  # (+ the model's half-precision output)
    if not train:
        return parts
    gradients = int(trainable * GRADIENT_COPIES[work.backend])
    if mlx and 3 * trainable > gradients + sum(parts.values()):  # AdamW's new weights and moments
        return {"gradients and optimizer update": 3 * trainable}
    return {"gradients": gradients} | parts


def _adapter_parameters(shape: ModelShape, work: Workload) -> int:
    if not work.use_lora:
        return 0
    return shape.num_layers * sum(
        work.lora_r * (a + c) for name, (a, c) in shape.linears().items() if name in work.lora_targets
    )
