"""The tiny offline model: builds locally, loads in transformers and mlx-lm alike."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlaif_mlx.data.tiny_model import (  # noqa: E402
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_tiny_model,
    default_corpus,
    ensure_tiny_model,
)

REPO = Path(__file__).resolve().parents[2]
# 2 layers x (attention 16512+8256+8256+16384, MLP 3*128*256, norms 2*128)
# + embeddings 1024*128 (tied with lm_head) + final norm 128.
EXPECTED_PARAMS = 2 * (16512 + 8256 + 8256 + 16384 + 98304 + 256) + 1024 * 128 + 128

CODE_SAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)  # grow\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f'{i:>3} even')\n",
    "x = {\"key\": [1, 2.5, -3e-4], 's': None}\r\n\n\n   \n    y = x  \n",
    "```python\ndef f(s: str) -> str:\n    return s[::-1]\n```\n",
    "name = 'héllo wörld €'  # non-ASCII\n",
    " leading space and trailing newlines\n\n",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def hf(model_dir):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer, info


@pytest.fixture(scope="module")
def mlx(model_dir):
    mlx_lm = pytest.importorskip("mlx_lm")
    return mlx_lm.load(str(model_dir))


def test_import_is_cheap():
    code = (
        "import sys, rlaif_mlx.data.tiny_model\n"
        "heavy = {'torch', 'mlx', 'transformers', 'tokenizers', 'safetensors'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_files_and_config(model_dir):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 10000.0
    assert config["rms_norm_eps"] == 1e-6
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["vocab_size"] == 1024

    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == IM_END
    assert tok_config["pad_token"] == PAD_TOKEN
    assert "<|im_start|>" in tok_config["chat_template"]

    vocab = json.loads((model_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids[IM_END], ids[PAD_TOKEN]]
    assert config["eos_token_id"] == ids[IM_END]


def test_weights_need_no_torch(model_dir):
    from safetensors.numpy import load_file

    weights = load_file(model_dir / "model.safetensors")
    assert sum(w.size for w in weights.values()) == EXPECTED_PARAMS
    assert "lm_head.weight" not in weights  # tied
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (64, 128)
    assert weights["model.layers.0.self_attn.q_proj.bias"].shape == (128,)
    assert all(str(w.dtype) == "float32" for w in weights.values())


def test_deterministic_given_seed(model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()


def test_ensure_is_idempotent_and_atomic(tmp_path):
    target = tmp_path / "m"
    target.mkdir()  # an empty folder is fine
    assert ensure_tiny_model(target, hidden_size=32, num_heads=2, num_kv_heads=1) == target
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_model(target)
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        ensure_tiny_model(junk)


def test_custom_corpus_and_size(tmp_path):
    corpus = [textwrap.dedent(inspect.getsource(textwrap))] * 2
    out = build_tiny_model(tmp_path / "m", corpus=corpus, vocab_size=400, num_layers=1)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 400
    assert config["num_hidden_layers"] == 1
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "bad", hidden_size=100, num_heads=3)


def test_default_corpus_has_quickstart_and_stdlib():
    corpus = default_corpus()
    assert any("def add(a, b):" in t for t in corpus)
    assert any("def dedent(" in t for t in corpus)  # textwrap's source


def test_transformers_loads_cleanly(hf):
    model, tokenizer, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS
    assert len(tokenizer) == model.config.vocab_size == 1024
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == PAD_TOKEN
    assert model.generation_config.eos_token_id == [
        tokenizer.convert_tokens_to_ids(IM_END),
        tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    ]


def test_tokenizer_round_trips_code(hf, mlx, model_dir):
    from tokenizers import Tokenizer

    _, tokenizer, _ = hf
    _, mlx_tokenizer = mlx
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    references = [json.loads(line)["reference"] for line in _quickstart_lines()]
    for text in CODE_SAMPLES + references[:10] + [inspect.getsource(json.decoder)]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        # Every loader must cut text into the same ids.
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert mlx_tokenizer.encode(text, add_special_tokens=False) == ids
        assert mlx_tokenizer.decode(ids) == text
    # Special tokens are single ids and survive a round trip.
    text = f"{IM_START}user\nhi{IM_END}\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START)
    assert tokenizer.convert_tokens_to_ids(IM_END) in ids
    assert tokenizer.decode(ids) == text


def test_chat_template(hf, mlx):
    _, tokenizer, _ = hf
    _, mlx_tokenizer = mlx
    user = "Write a Python function `add(a, b)` that returns the sum of a and b."
    messages = [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert f"<|im_start|>user\n{user}<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    text2 = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert text2.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert text2.count("<|im_start|>system") == 1

    ids = tokenizer.encode(text, add_special_tokens=False)
    assert mlx_tokenizer.apply_chat_template(messages, add_generation_prompt=True) == ids


def test_mlx_loads_with_qwen_eos(mlx, model_dir):
    model, tokenizer = mlx
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token_ids == {
        tokenizer.convert_tokens_to_ids(IM_END),
        tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    }
    assert tokenizer.has_chat_template
    assert model.args.rope_theta == 10000.0
    import mlx.utils

    n_params = sum(v.size for _, v in mlx.utils.tree_flatten(model.parameters()))
    assert n_params == EXPECTED_PARAMS


def test_transformers_and_mlx_logits_match(hf, mlx):
    import mlx.core as mx
    import numpy as np
    import torch

    hf_model, tokenizer, _ = hf
    mlx_model, _ = mlx
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write `square(x)`."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer.encode(prompt + CODE_SAMPLES[1], add_special_tokens=False)
    batch = [ids, list(reversed(ids))]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(batch)).logits.numpy()
    mlx_logits = np.array(mlx_model(mx.array(batch)))
    assert hf_logits.shape == mlx_logits.shape == (2, len(ids), 1024)
    np.testing.assert_allclose(mlx_logits, hf_logits, atol=1e-4, rtol=0)
    # A random model is not degenerate: positions and rows differ.
    assert np.abs(hf_logits[0, 0] - hf_logits[0, -1]).max() > 1e-3


def _quickstart_lines() -> list[str]:
    import importlib.resources

    text = (importlib.resources.files("rlaif_mlx.data") / "datasets" / "quickstart_train.jsonl").read_text()
    return [line for line in text.splitlines() if line.strip()]
