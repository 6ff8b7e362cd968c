"""Build a tiny random Qwen2-style model with a locally trained tokenizer.

Tests and the quickstart run with no network, so they cannot download weights.
`build_tiny_model` writes a small random causal LM in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that both `transformers` and `mlx_lm.load` open.

The weights are drawn with numpy and written with `safetensors.numpy`, so an
MLX-only install (no torch) can build it too. The tokenizer is a byte-level BPE
trained with the `tokenizers` library on the bundled quickstart tasks plus some
Python source from the standard library, with Qwen2's exact normalizer and
pre-tokenizer and the ChatML chat template; it is saved through transformers
(which mlx-lm needs anyway).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
DEFAULT_SYSTEM_PROMPT = "You are a helpful coding assistant."
# Qwen2's pre-tokenizer split (digits one by one, runs of whitespace kept whole).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen-style ChatML: a default system turn when the conversation has none.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Small, stable stdlib modules whose source is plain, idiomatic Python.
_STDLIB_MODULES = (
    "textwrap",
    "heapq",
    "bisect",
    "fnmatch",
    "colorsys",
    "string",
    "shlex",
    "glob",
    "queue",
    "graphlib",
)
_QUICKSTART_FILES = ("quickstart_train.jsonl", "quickstart_eval.jsonl")


def build_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
    corpus: list[str] | None = None,
) -> Path:
    """Write a tiny random Qwen2 causal LM and its tokenizer to `path`.

    The model is random (it generates noise until trained) but has the real
    Qwen2 architecture, parameter names and chat format, so every code path of
    both backends runs on it. Nothing touches the network.

    Args:
        path: Output folder; created if missing, files in it are overwritten.
        seed: Seed for the weights. The same seed and corpus give the same files.
        hidden_size: Model width; must be divisible by `num_heads`.
        num_layers: Number of transformer blocks.
        num_heads: Attention (query) heads.
        num_kv_heads: Key/value heads (grouped-query attention); divides `num_heads`.
        intermediate_size: Width of the SwiGLU MLP.
        vocab_size: Target size of the BPE vocabulary, special tokens included.
            The model's vocabulary is the tokenizer's actual size, which is
            smaller when the corpus does not yield enough merges.
        max_position_embeddings: Longest sequence the config declares.
        corpus: Texts to train the tokenizer on. Default: the bundled
            quickstart prompts, references and tests plus some stdlib source.

    Returns:
        The output folder as a `Path`.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})."
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    n_vocab = tokenizer.get_vocab_size()
    pad_id, im_end_id = tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(IM_END)
    _save_tokenizer(tokenizer, out, max_position_embeddings)

    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "rms_norm_eps": 1e-6,
        # mlx-lm reads the top-level rope_theta (its default is 1e6);
        # transformers 5 reads rope_parameters.
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "vocab_size": n_vocab,
        "bos_token_id": pad_id,
        "eos_token_id": im_end_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    _write_json(out / "config.json", config)
    # Like Qwen instruct models: stop on <|im_end|> and on <|endoftext|>.
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": pad_id,
            "eos_token_id": [im_end_id, pad_id],
            "pad_token_id": pad_id,
        },
    )
    _write_weights(
        out / "model.safetensors",
        seed=seed,
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
    )
    return out


def ensure_tiny_model(path: str | Path, **kwargs) -> Path:
    """Build the tiny model at `path` unless `path/config.json` already exists.

    The model is built in a sibling temporary folder and renamed into place, so
    an interrupted build never leaves a half-written model behind.

    Args:
        path: Where the model lives (or will live).
        **kwargs: Passed to `build_tiny_model` when a build is needed.

    Returns:
        `path` as a `Path`.
    """
    out = Path(path)
    if (out / "config.json").exists():
        return out
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not empty, but has no config.json, so it is not a "
            "model folder. Remove it, or pick another path for the tiny model."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        build_tiny_model(tmp, **kwargs)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder (e.g. from a test fixture) is not a model
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first; its model is as good as ours.
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_corpus() -> list[str]:
    """Texts the default tokenizer is trained on: quickstart tasks + stdlib source."""
    texts: list[str] = []
    data = importlib.resources.files("rlaif_mlx.data") / "datasets"
    for name in _QUICKSTART_FILES:
        resource = data / name
        if not resource.is_file():
            continue
        for line in resource.read_text(encoding="utf-8").splitlines():
            if line.strip():
                task = json.loads(line)
                texts += [task.get("prompt", ""), task.get("reference", ""), task.get("tests", "")]
    for module in _STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        if origin and origin.endswith(".py") and os.path.isfile(origin):
            texts.append(Path(origin).read_text(encoding="utf-8"))
    texts.append(CHAT_TEMPLATE)
    return [t for t in texts if t]


def _train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    # The exact Qwen2 pipeline: transformers 5 rebuilds it for any model_type
    # "qwen2" checkpoint whatever tokenizer.json says, so ours must match it for
    # `tokenizers`, transformers 4.x/5.x and mlx-lm to give the same ids.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tokenizer


def _save_tokenizer(tokenizer, out: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    # Keep the chat template inside tokenizer_config.json (not chat_template.jinja)
    # so older transformers releases find it too.
    hf_tokenizer.save_pretrained(str(out), save_jinja_files=False)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 5 writes a list under "extra_special_tokens"; 4.x expects
    # "additional_special_tokens" (both read the latter).
    config.pop("extra_special_tokens", None)
    config["additional_special_tokens"] = [IM_START, IM_END]
    config["chat_template"] = CHAT_TEMPLATE
    _write_json(config_path, config)


def _write_weights(
    file: Path,
    *,
    seed: int,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    head_dim = hidden_size // num_heads
    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # Exact Hugging Face Qwen2 names; lm_head is tied to embed_tokens.
    weights = {"model.embed_tokens.weight": normal(vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        # Non-zero biases, so a loader that drops them fails the parity test.
        weights |= {
            p + "self_attn.q_proj.weight": normal(q_dim, hidden_size),
            p + "self_attn.q_proj.bias": normal(q_dim),
            p + "self_attn.k_proj.weight": normal(kv_dim, hidden_size),
            p + "self_attn.k_proj.bias": normal(kv_dim),
            p + "self_attn.v_proj.weight": normal(kv_dim, hidden_size),
            p + "self_attn.v_proj.bias": normal(kv_dim),
            p + "self_attn.o_proj.weight": normal(hidden_size, q_dim),
            p + "mlp.gate_proj.weight": normal(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": normal(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": normal(hidden_size, intermediate_size),
            p + "input_layernorm.weight": ones(hidden_size),
            p + "post_attention_layernorm.weight": ones(hidden_size),
        }
    weights["model.norm.weight"] = ones(hidden_size)
    save_file(weights, str(file), metadata={"format": "pt"})
    os.chmod(file, 0o644)  # safetensors writes 0600; the other files are 0644


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
