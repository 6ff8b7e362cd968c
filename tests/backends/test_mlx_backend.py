"""What only the MLX backend has, on a real tiny model (CPU, no mocks, no network).

The ``Backend`` contract both backends keep is ``test_contract.py``; the fast paths are
``test_mlx_fast_paths.py``, parity with torch ``test_cross_backend.py``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from backend_helpers import encode, make  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402

from rlaif_mlx.backends import mlx_decode, mlx_load  # noqa: E402
from rlaif_mlx.backends.base import SamplingParams  # noqa: E402
from rlaif_mlx.backends.mlx_ops import batch_cache, choose, left_pad  # noqa: E402
from rlaif_mlx.config import ModelConfig  # noqa: E402


def test_options_for_torch_are_ignored_with_a_note_and_the_memory_limit_is_set(tiny_model_path, caplog):
    previous = mx.set_memory_limit(mx.get_memory_limit())
    previous_cache = mx.set_cache_limit(2**40)
    try:
        with caplog.at_level("WARNING", logger="rlaif_mlx.backends.mlx"):
            backend = make(
                "mlx",
                tiny_model_path,
                model={
                    "torch": {"device": "cpu", "attn_implementation": "eager"},
                    "mlx": {"memory_limit_gb": 48, "cache_limit_gb": 1},
                },
            )
        assert "model.torch.device, model.torch.attn_implementation: PyTorch-only" in caplog.text
        assert mx.get_memory_limit() == 48 * 1024**3
        assert mx.set_cache_limit(2**40) == 1024**3
        assert backend.sample(encode(backend, ["x"]), n=1, params=SamplingParams(max_new_tokens=2))
    finally:
        mx.set_memory_limit(previous)
        mx.set_cache_limit(previous_cache)


def test_a_hub_id_loads_from_its_local_snapshot(tiny_model_path, tmp_path, monkeypatch):
    """A local folder is itself; a hub id is the hub cache's snapshot of it (offline: no network)."""
    assert mlx_load.model_folder(str(tiny_model_path)) == tiny_model_path
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_model_path, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert mlx_load.model_folder("someone/tiny") == repo / "snapshots" / revision
    backend = make("mlx", "someone/tiny")
    local = make("mlx", tiny_model_path)
    params = SamplingParams(max_new_tokens=6, seed=1)
    assert backend.sample(encode(backend), n=1, params=params) == local.sample(encode(local), n=1, params=params)


def test_left_padded_cached_decode_equals_full_forward(tiny_model_path):
    # BatchKVCache offsets RoPE per row: a left-padded row decodes as if unpadded.
    policy = mlx_load.load_policy(ModelConfig(base_model=str(tiny_model_path), lora_r=4), seed=0, device="cpu")
    model = policy.model
    prompts = [policy.tokenizer.encode(t, add_special_tokens=False) for t in ["def add(a, b):\n    return", "y"]]
    extra = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]
    ids, padding = left_pad(prompts, pad_id=policy.pad_id)
    assert padding[0] == 0 and padding[1] > 0
    cache = batch_cache(model, padding)
    logits = mlx_decode.forward_step(model, ids, cache)
    for t in range(5):
        logits = mlx_decode.forward_step(model, mx.array([[extra[0][t]], [extra[1][t]]]), cache)
    for row, (p, e) in enumerate(zip(prompts, extra, strict=True)):
        full = model(mx.array([p + e]))[0, -1]
        np.testing.assert_allclose(np.array(logits[row]), np.array(full), atol=1e-4)


def test_prompt_is_prefilled_once_per_prompt(tiny_model_path, monkeypatch):
    backend = make("mlx", tiny_model_path)
    calls = []
    step = mlx_decode.forward_step

    def counted(model, ids, cache):  # one model forward each
        calls.append(tuple(ids.shape))
        return step(model, ids, cache)

    monkeypatch.setattr(mlx_decode, "forward_step", counted)
    backend.sample(encode(backend), n=4, params=SamplingParams(max_new_tokens=5, seed=0))
    width = max(len(p) for p in encode(backend))
    assert calls[0] == (3, width)  # one prefill for the 3 prompts, not 12
    assert all(shape == (12, 1) for shape in calls[1:])  # then one token per row per step
    assert len(calls) <= 5


def test_filters_keep_only_allowed_tokens():
    logits = mx.array([[0.0, 3.0, 2.0, 1.0, -1.0]] * 512)
    u = mx.random.uniform(shape=(512,), key=mx.random.key(0))
    seen = lambda params: set(choose(logits, params, u)[0].tolist())  # noqa: E731
    assert seen(SamplingParams(top_k=2)) == {1, 2}
    assert seen(SamplingParams(top_p=0.5)) == {1}  # p(1) ~ 0.64 covers 0.5 alone
    assert seen(SamplingParams(top_p=0.9)) == {1, 2, 3}  # 0.64 + 0.24 < 0.9: the third token is needed
    assert seen(SamplingParams(min_p=0.3)) == {1, 2}  # p(2)/p(1) = e^-1 ~ 0.37; p(3)/p(1) ~ 0.14
    assert seen(SamplingParams(temperature=0.0)) == {1}
    assert seen(SamplingParams()) == {0, 1, 2, 3, 4}
