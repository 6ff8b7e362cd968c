"""Models and prompts for the benchmarks: built locally, identical for every backend.

`tiny` is the quickstart's random model (`build_tiny_model` defaults). `30m` is
a ~30M-parameter random Qwen2 of the same family: its widths (512, 128, 1664)
are multiples of 64, so MLX's group-64 quantisation applies to every layer.
Its 8k BPE vocabulary needs more text than the default corpus holds, so the
tokenizer is trained on the default corpus plus the top-level stdlib modules.

Nothing here imports torch or mlx: the parent process of `bench_sampling.py`
stays light, and each measured case runs in a fresh child.
"""

from __future__ import annotations

import json
import struct
import sysconfig
from pathlib import Path

from rlaif_mlx.data.tiny_model import default_corpus, ensure_tiny_model

MODELS_DIR = Path(__file__).resolve().parent / ".models"

# Folder name -> build_tiny_model keywords. The name spells the shape, so a
# changed spec builds a new folder instead of reusing a stale one.
BUILT = {
    "tiny": ("qwen2-tiny-h128-l2-v1024", {}),
    "30m": (
        "qwen2-30m-h512-l8-i1664-v8192",
        {
            "hidden_size": 512,
            "num_layers": 8,
            "num_heads": 8,
            "num_kv_heads": 2,
            "intermediate_size": 1664,
            "vocab_size": 8192,
            "max_position_embeddings": 2048,
        },
    ),
}

# Source of the prompts: plain Python, cut into windows of exactly L tokens.
_PROMPT_MODULES = ("textwrap", "heapq", "bisect", "fnmatch", "shlex", "graphlib", "string", "queue", "glob")


def resolve_model(spec: str, *, models_dir: Path = MODELS_DIR) -> str:
    """The model folder or hub id for `spec`; `tiny` and `30m` are built on first use.

    Args:
        spec: `tiny`, `30m`, a local folder, or a Hugging Face hub id.
        models_dir: where built models are cached (gitignored).

    Returns:
        A local folder path, or `spec` unchanged when it is a hub id.
    """
    if spec in BUILT:
        name, kwargs = BUILT[spec]
        if spec == "30m":
            kwargs = kwargs | {"corpus": default_corpus() + _stdlib_sources()}
        return str(ensure_tiny_model(models_dir / name, **kwargs))
    return spec


def _stdlib_sources() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.glob("*.py"))]


def make_prompts(model: str, *, count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of exactly `length` token ids each (consecutive windows of stdlib code).

    Raises:
        ValueError: the source text is too short for `count * length` tokens.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = "\n\n".join(_module_source(m) for m in _PROMPT_MODULES)
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)  # longer than the model's window: fine
    if len(ids) < count * length:
        raise ValueError(f"the prompt text has {len(ids)} tokens; {count} prompts of {length} need more")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def _module_source(name: str) -> str:
    import importlib.util

    return Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")


def describe(model: str) -> dict:
    """Architecture numbers from config.json and the parameter count from the safetensors headers.

    A hub id that is not in the local cache gives only its name.
    """
    folder = Path(model)
    if not (folder / "config.json").is_file():
        return {"model": model}
    config = json.loads((folder / "config.json").read_text())
    params = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, entry in header.items():
            if key != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                params += count
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
    )
    return {"model": model, "parameters": params, **{k: config.get(k) for k in keys}}
