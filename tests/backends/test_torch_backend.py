"""What only the PyTorch backend has, on a real tiny model (CPU, no mocks, no network).

The ``Backend`` contract both backends keep is ``test_contract.py``; the decode cache is
``test_torch_decode.py``, the fast paths ``test_torch_speedups.py``, FSDP ``test_fsdp.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from backend_helpers import encode, make  # noqa: E402
from conftest import TORCH_DEVICE  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from rlaif_mlx.backends import torch_decode, torch_load  # noqa: E402
from rlaif_mlx.backends.base import SamplingParams  # noqa: E402
from rlaif_mlx.config import ModelConfig  # noqa: E402


def test_options_for_mlx_are_ignored_with_a_note(tiny_model_path, caplog):
    with caplog.at_level("WARNING", logger="rlaif_mlx.backends.torch"):
        backend = make("torch", tiny_model_path, model={"mlx": {"memory_limit_gb": 8, "cache_limit_gb": 0}})
    assert "model.mlx.memory_limit_gb, model.mlx.cache_limit_gb: MLX-only" in caplog.text
    assert backend.sample(encode(backend, ["x"]), n=1, params=SamplingParams(max_new_tokens=2))
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlaif_mlx.backends.torch"):
        make("torch", tiny_model_path)
    assert "MLX-only" not in caplog.text


def test_progress_bars_are_off_while_loading_only(tiny_model_path, monkeypatch):
    # importing the backend leaves transformers' logging as the caller set it
    code = (
        "from transformers.utils import logging\n"
        "logging.enable_progress_bar()\n"
        "import rlaif_mlx.backends.torch\n"
        "assert logging.is_progress_bar_enabled()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # loading a model switches them off, then back to what they were
    seen = []
    load = torch_load.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        torch_load.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: seen.append(hf_logging.is_progress_bar_enabled()) or load(*a, **k),
    )
    callers = hf_logging.is_progress_bar_enabled()
    try:
        for setting in (True, False):
            (hf_logging.enable_progress_bar if setting else hf_logging.disable_progress_bar)()
            make("torch", tiny_model_path)
            assert hf_logging.is_progress_bar_enabled() == setting
    finally:
        (hf_logging.enable_progress_bar if callers else hf_logging.disable_progress_bar)()
    assert seen == [False, False]


def test_cached_decode_equals_full_forward(tiny_model_path):
    # Two left-padded prompts, prefill once, then feed 5 tokens one by one, as sampling does.
    config = ModelConfig(base_model=str(tiny_model_path), lora_r=4)
    policy = torch_load.load_policy(config, device=TORCH_DEVICE, seed=0)
    model, step = policy.model.eval(), torch_decode.forward_step
    prompts = [policy.tokenizer.encode(t) for t in ["def add(a, b):\n    return", "y"]]
    extra = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]
    with torch.inference_mode():
        width = max(len(p) for p in prompts)
        on = {"device": TORCH_DEVICE}
        ids = torch.tensor([[policy.pad_id] * (width - len(p)) + p for p in prompts], **on)
        mask = (
            torch.arange(width, **on)[None] >= torch.tensor([width - len(p) for p in prompts], **on)[:, None]
        ).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = step(model, ids, mask, pos, None, cache_arg=policy.cache_arg)
        next_pos = pos[:, -1] + 1
        for t in range(5):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long, **on)], dim=1)
            tokens = torch.tensor([extra[0][t], extra[1][t]], **on)[:, None]
            logits, cache = step(model, tokens, mask, next_pos[:, None], cache, cache_arg=policy.cache_arg)
            next_pos = next_pos + 1
        for row, (p, e) in enumerate(zip(prompts, extra, strict=True)):
            full = model(input_ids=torch.tensor([p + e], **on)).logits[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-4, rtol=0)


def test_prompt_is_prefilled_once_per_prompt(tiny_model_path, monkeypatch):
    backend = make("torch", tiny_model_path)
    calls = []
    step = torch_decode.forward_step

    def counted(model, ids, *args, **kwargs):  # one model forward each
        calls.append(tuple(ids.shape))
        return step(model, ids, *args, **kwargs)

    monkeypatch.setattr(torch_decode, "forward_step", counted)
    backend.sample(encode(backend), n=4, params=SamplingParams(max_new_tokens=5, seed=0))
    width = max(len(p) for p in encode(backend))
    assert calls[0] == (3, width)  # one prefill for the 3 prompts, not 12
    assert all(shape == (12, 1) for shape in calls[1:])  # then one token per row per step
    assert len(calls) <= 5
