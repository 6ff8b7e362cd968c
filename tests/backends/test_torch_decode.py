"""The PyTorch backend's preallocated decode cache (``backends/torch_decode.py``) against transformers' own.

Real tiny model (``tiny_model_path``), no mocks: sampling through the preallocated
buffers gives the ids and log-probs of sampling through the growing ``DynamicCache``
(``TorchBackend.preallocate_decode_cache`` off), and the preallocated path is the one
sampling takes by default.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import TORCH_DEVICE  # noqa: E402
from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

from rlaif_mlx.backends import torch_decode as decode  # noqa: E402
from rlaif_mlx.backends.base import SamplingParams  # noqa: E402
from rlaif_mlx.backends.torch import TorchBackend, create  # noqa: E402
from rlaif_mlx.config import ModelConfig, TrainingConfig  # noqa: E402

PROMPTS = ["def add(a, b):\n    return", "import os\nprint(", "x"]  # different lengths: left padding


@pytest.fixture(scope="module", params=[True, False], ids=["lora", "full"])
def backend(request, tiny_model_path) -> TorchBackend:
    config = ModelConfig(
        base_model=str(tiny_model_path), use_lora=request.param, lora_r=4, torch={"device": TORCH_DEVICE}
    )
    return create(config, TrainingConfig(), seed=0, total_steps=1)


def sample_both(backend, monkeypatch, params: SamplingParams, *, n: int):
    prompts = [backend.tokenizer.encode(t) for t in PROMPTS]
    assert backend.preallocate_decode_cache  # the default
    fast = backend.sample(prompts, n=n, params=params)
    with monkeypatch.context() as m:
        m.setattr(backend, "preallocate_decode_cache", False)
        dynamic = backend.sample(prompts, n=n, params=params)
    return fast, dynamic


def assert_same(fast, dynamic) -> None:
    assert [c.completion_ids for c in fast] == [c.completion_ids for c in dynamic]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in dynamic]
    for a, b in zip(fast, dynamic, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=24, seed=(3, 4, 5)),
        SamplingParams(max_new_tokens=12, seed=9, temperature=0.7, top_p=0.9, top_k=40),
        SamplingParams(max_new_tokens=8, top_k=1),
    ],
    ids=["policy", "filtered", "greedy"],
)
def test_preallocated_decode_equals_the_dynamic_cache(backend, monkeypatch, params):
    assert_same(*sample_both(backend, monkeypatch, params, n=3))


def test_rows_finishing_early_decode_as_with_the_dynamic_cache(backend, monkeypatch):
    # EOS := a token row 0 samples at its third step, so some rows end early and keep decoding pad
    params = SamplingParams(max_new_tokens=20, seed=(1, 2, 3))
    monkeypatch.setattr(backend, "eos_ids", ())
    free = backend.sample([backend.tokenizer.encode(t) for t in PROMPTS], n=4, params=params)
    monkeypatch.setattr(backend, "eos_ids", (free[0].completion_ids[2],))
    fast, dynamic = sample_both(backend, monkeypatch, params, n=4)
    reasons = {c.finish_reason for c in fast}
    assert reasons == {"eos", "length"}, reasons
    assert len(fast[0].completion_ids) <= 3
    assert_same(fast, dynamic)


def test_sampling_decodes_through_the_preallocated_buffers(backend, tiny_model_path, monkeypatch):
    """Each layer grows by ``torch.cat`` only in the prefill; every decode step writes into the buffers.

    ``preallocate_decode_cache`` is an option of each backend, not a module-wide switch.
    """
    calls = {"dynamic": 0, "buffer": 0}
    grow, write = DynamicLayer.update, decode.BufferLayer.update

    def counted(kind, update):
        def spy(self, *args, **kwargs):
            calls[kind] += 1
            return update(self, *args, **kwargs)

        return spy

    monkeypatch.setattr(DynamicLayer, "update", counted("dynamic", grow))
    monkeypatch.setattr(decode.BufferLayer, "update", counted("buffer", write))
    monkeypatch.setattr(backend, "eos_ids", ())  # every row runs all 6 tokens: 5 decode steps
    layers = json.loads((tiny_model_path / "config.json").read_text())["num_hidden_layers"]
    prompts, params = [backend.tokenizer.encode(t) for t in PROMPTS], SamplingParams(max_new_tokens=6, top_k=1)
    backend.sample(prompts, n=2, params=params)
    assert calls == {"dynamic": layers, "buffer": 5 * layers}
    # switched off on this backend, every step grows transformers' cache
    calls.update(dynamic=0, buffer=0)
    monkeypatch.setattr(backend, "preallocate_decode_cache", False)
    backend.sample(prompts, n=2, params=params)
    assert calls == {"dynamic": 6 * layers, "buffer": 0}


def test_the_buffers_hold_what_the_dynamic_cache_holds():
    """Repeated rows and appended positions, value for value, against ``batch_repeat_interleave`` and ``torch.cat``."""
    gen = torch.Generator().manual_seed(0)
    on = {"device": TORCH_DEVICE}

    def states(rows, length):
        return [torch.randn(rows, 2, length, 4, generator=gen).to(**on) for _ in range(2)]

    prefill = [states(3, 5) for _ in range(2)]
    dynamic, fast = DynamicCache(), DynamicCache()
    for i, (k, v) in enumerate(prefill):
        dynamic.update(k, v, i)
        fast.update(k, v, i)
    dynamic.batch_repeat_interleave(2)
    fast = decode.repeated_cache(fast, 2, room=3, preallocate=True)
    assert all(isinstance(layer, decode.BufferLayer) for layer in fast.layers)
    for step in range(3):
        new = [states(6, 1) for _ in range(2)]
        for i, (k, v) in enumerate(new):
            want, got = dynamic.update(k, v, i), fast.update(k, v, i)
            for w, g in zip(want, got, strict=True):
                assert torch.equal(w, g)
        assert fast.get_seq_length() == dynamic.get_seq_length() == 6 + step
    with pytest.raises(RuntimeError, match="holds 8 positions"):
        fast.update(*states(6, 1), 0)
    with pytest.raises(NotImplementedError):
        fast.batch_repeat_interleave(2)


def test_other_cache_layers_fall_back_to_the_dynamic_cache():
    layer = type("SlidingLayer", (DynamicLayer,), {})()  # any layer kind but the plain DynamicLayer
    cache = DynamicCache()
    cache.layers = [layer]
    k = torch.randn(2, 1, 3, 4)
    layer.update(k, k.clone())
    out = decode.repeated_cache(cache, 3, room=2, preallocate=True)
    assert out.layers == [layer] and layer.keys.shape == (6, 1, 3, 4)
