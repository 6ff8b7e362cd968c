"""The MLX backend's fast paths, each checked against the plain computation it replaces.

- sampling: one inverse-CDF pass gives the token and its log-prob; per-prompt seeds stay independent;
- prefill: the LM head on the last prompt position only (tied, untied and quantised heads);
- log-probs and training: each shared prompt forwarded once, then its KV cache repeated to its rows.

Real tiny models on the CPU, no mocks.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.nn as nn  # noqa: E402
from backend_helpers import encode, mlx_lora_model, plain_logp, plain_model, with_random_adapters  # noqa: E402
from backend_helpers import make as make_backend  # noqa: E402

from rlaif_mlx.backends import mlx_decode, mlx_groups, mlx_ops  # noqa: E402
from rlaif_mlx.backends.base import Completion, LossSettings, SamplingParams, SequenceBatch, TrainBatch  # noqa: E402
from rlaif_mlx.rl.objective import aggregation_weights  # noqa: E402


def make(path, *, model: dict | None = None, **training):
    return make_backend("mlx", path, total_steps=10, model=model, **training)


def whole_row_logp(model, seqs: SequenceBatch) -> np.ndarray:
    ids, attn = (mx.array(a.astype(np.int32)) for a in (seqs.input_ids, seqs.attention_mask))
    return np.array(mlx_ops.token_logp(model, ids, attn))


def all_weights(backend) -> dict[str, np.ndarray]:
    return backend.parameters() | backend.parameters(which="frozen")


@pytest.fixture(scope="module")
def lora(tiny_model_path):
    return make(tiny_model_path)


@pytest.fixture(scope="module")
def untied_path(tiny_model_path, tmp_path_factory):
    """The tiny model with its own ``lm_head`` (random, unlike the embeddings it was tied to)."""
    path = tmp_path_factory.mktemp("untied") / "tiny-untied"
    shutil.copytree(tiny_model_path, path)
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(path / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = mx.random.normal(embed.shape, key=mx.random.key(3)) * 0.05
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def quantized_path(tiny_model_path, tmp_path_factory):
    """The tiny model quantised to 8 bits by mlx-lm's own converter."""
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("quantized") / "tiny-8bit"
    convert(str(tiny_model_path), mlx_path=str(path), quantize=True, q_group_size=64, q_bits=8)
    return path


# ------------------------------------------------------------------ sampling


def test_a_prompts_samples_depend_on_its_own_seed_only(lora):
    prompts = encode(lora)
    params = SamplingParams(max_new_tokens=8, seed=(5, 6, 7), top_p=0.95)
    whole = lora.sample(prompts, n=3, params=params)
    alone = lora.sample(prompts[1:2], n=3, params=SamplingParams(max_new_tokens=8, seed=(6,), top_p=0.95))
    assert [c.completion_ids for c in alone] == [c.completion_ids for c in whole[3:6]]
    swapped = lora.sample(prompts[::-1], n=3, params=SamplingParams(max_new_tokens=8, seed=(7, 6, 5), top_p=0.95))
    assert [c.completion_ids for c in swapped[6:]] == [c.completion_ids for c in whole[:3]]


def test_inverse_cdf_draw_matches_the_distribution_and_its_log_probs():
    from rlaif_mlx.backends.mlx_ops import choose as _choose

    row = np.array([0.5, -1.0, 2.0, 0.0, 1.0, -np.inf], dtype=np.float32)
    rows = 40_000
    logits = mx.array(np.tile(row, (rows, 1)))
    u = mx.random.uniform(shape=(rows,), key=mx.random.key(1))
    for params, temperature in ((SamplingParams(), 1.0), (SamplingParams(temperature=0.5), 0.5)):
        tokens, logp = _choose(logits, params, u)
        tokens, logp = np.array(tokens), np.array(logp)
        expected = np.exp(row[:5] / temperature) / np.exp(row[:5] / temperature).sum()
        freq = np.bincount(tokens, minlength=6) / rows
        assert freq[5] == 0  # -inf: zero probability, never drawn
        np.testing.assert_allclose(freq[:5], expected, atol=0.01)
        np.testing.assert_allclose(logp, np.log(expected)[tokens], atol=1e-6)  # the log-probs of what was drawn
    # truncated: the draw keeps the top two, the log-prob stays the tempered, untruncated policy's
    tokens, logp = (np.array(a) for a in _choose(logits, SamplingParams(temperature=0.5, top_k=2), u))
    assert set(tokens.tolist()) == {2, 4}
    np.testing.assert_allclose(logp, np.log(expected)[tokens], atol=1e-6)


def test_the_draw_never_picks_a_zero_probability_token():
    from rlaif_mlx.backends.mlx_ops import choose as _choose

    # u at the ends of [0, 1): the first and the last token with weight, never the filtered tail or head
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))
    logits = mx.array([[-np.inf, 1.0, 2.0, -np.inf, -np.inf], [5.0, 1.0, 2.0, 0.5, 4.9]] * 2, dtype=mx.float32)
    u = mx.array([0.0, 0.0, below_one, below_one])
    assert _choose(logits, SamplingParams(), u)[0].tolist() == [1, 0, 2, 4]
    assert _choose(logits, SamplingParams(top_k=2), u)[0].tolist() == [1, 0, 2, 4]
    assert _choose(logits, SamplingParams(min_p=0.5), u)[0].tolist() == [2, 0, 2, 4]
    # u * total rounding up to the total (u = 1 stands in for it) would land past the last kept token:
    # the draw falls back to the best token instead of a zero-weight one
    logits = mx.array([[1.0, 3.0] + [-np.inf] * 6] * 2)
    assert _choose(logits, SamplingParams(), mx.array([below_one, 1.0]))[0].tolist() == [1, 1]


def test_logsumexp_and_its_gradient_equal_mlx_own():
    x = mx.random.normal((3, 5, 1024), key=mx.random.key(4)) * 4
    x = mx.concatenate([x, mx.full((3, 5, 1), -200.0)], axis=-1)  # a term under the floor
    np.testing.assert_allclose(np.array(mlx_ops.logsumexp(x)), np.array(mx.logsumexp(x, axis=-1)), rtol=1e-6)
    weights = mx.random.normal((3, 5), key=mx.random.key(5))
    ours = mx.grad(lambda z: (mlx_ops.logsumexp(z) * weights).sum())(x)
    theirs = mx.grad(lambda z: (mx.logsumexp(z, axis=-1) * weights).sum())(x)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- prefill


@pytest.mark.parametrize("capacity", [None, 2, 40])  # mlx-lm's blocks of 256; outgrown at once; sized to the call
def test_a_cache_sized_to_the_call_gives_the_blocks_logits(tiny_model_path, capacity):
    backend = make(tiny_model_path)
    model = plain_model("mlx", tiny_model_path)
    ids, padding = mlx_ops.left_pad(encode(backend), pad_id=backend.pad_id)

    def decode(cache):
        out = [mlx_ops.last_logits(model, ids, cache)]
        mlx_ops.repeat_cache(cache, 2)
        step = mx.repeat(mx.argmax(out[0], axis=-1), 2)[:, None].astype(mx.int32)
        for _ in range(5):
            out.append(mlx_ops.last_logits(model, step, cache))
            step = mx.argmax(out[-1], axis=-1)[:, None].astype(mx.int32)
        return np.array(mx.concatenate([out[0].reshape(-1), *(o.reshape(-1) for o in out[1:])]))

    blocks = decode(mlx_ops.batch_cache(model, padding))
    np.testing.assert_array_equal(decode(mlx_ops.batch_cache(model, padding, capacity=capacity)), blocks)


@pytest.mark.parametrize("kind", ["tied", "untied", "quantized"])
def test_prefill_head_on_the_last_position_equals_the_full_forward(tiny_model_path, untied_path, quantized_path, kind):
    path = {"tied": tiny_model_path, "untied": untied_path, "quantized": quantized_path}[kind]
    backend = make(path)
    model = plain_model("mlx", path)  # the backend's policy too: its adapters add nothing yet (B = 0)
    head = mlx_ops.lm_head(model)
    assert head is not None  # the fast path, not the fallback
    if kind == "untied":
        assert head == model.lm_head and not np.array_equal(
            np.array(model.lm_head.weight), np.array(model.model.embed_tokens.weight)
        )
    if kind == "quantized":
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    prompts = encode(backend)
    ids, padding = mlx_ops.left_pad(prompts, pad_id=backend.pad_id)
    fast = mlx_ops.last_logits(model, ids, mlx_ops.batch_cache(model, padding))
    full = model(ids, cache=mlx_ops.batch_cache(model, padding))[:, -1, :]
    np.testing.assert_allclose(np.array(fast), np.array(full), atol=1e-5)
    # and the sampled log-probs are the teacher-forced ones
    completions = backend.sample(prompts, n=2, params=SamplingParams(max_new_tokens=6, seed=0))
    seqs = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
    forced = whole_row_logp(model, seqs)
    for i, c in enumerate(completions):
        start = len(c.prompt_ids) - 1
        np.testing.assert_allclose(c.logprobs, forced[i, start : start + len(c.logprobs)], atol=1e-4)


def test_an_unknown_layout_keeps_the_full_forward(lora, tiny_model_path):
    class Wrapped(nn.Module):  # not an mlx-lm model file: its logits might be anything
        def __init__(self, inner):
            super().__init__()
            self.model = inner.model
            self.args = inner.args
            self.inner = inner

        @property
        def layers(self):
            return self.inner.layers

        def __call__(self, ids, cache=None):
            return 2.0 * self.inner(ids, cache=cache)

    model = plain_model("mlx", tiny_model_path)
    wrapped = Wrapped(model)
    assert mlx_ops.lm_head(wrapped) is None
    ids, padding = mlx_ops.left_pad(encode(lora), pad_id=lora.pad_id)
    got = mlx_ops.last_logits(wrapped, ids, mlx_ops.batch_cache(wrapped, padding))
    full = model(ids, cache=mlx_ops.batch_cache(model, padding))[:, -1, :]
    np.testing.assert_allclose(np.array(got), 2.0 * np.array(full), atol=1e-5)


# ---------------------------------------------------------- shared prompts


def shared_prompt_batch(vocab: int = 1000) -> SequenceBatch:
    """Prompts of lengths 7, 3, 12 and 1, three completions each of lengths 1 to 8."""
    rng = np.random.default_rng(0)
    completions = []
    for p, length in enumerate((7, 3, 12, 1)):
        prompt = tuple(int(t) for t in rng.integers(3, vocab, size=length))
        for s, n in enumerate((6, 1, 8) if p != 1 else (4, 1, 6)):
            ids = tuple(int(t) for t in rng.integers(3, vocab, size=n))
            completions.append(Completion(f"{p}-{s}", p, s, prompt, ids, (0.0,) * n, "", "length"))
    return SequenceBatch.from_completions(completions, pad_id=0)


@pytest.mark.parametrize("micro_batch_size", [3, 4, 12])  # 3: a 1-token prompt alone; 4: groups split
def test_shared_prompt_log_probs_equal_the_whole_row_forward(tiny_model_path, micro_batch_size):
    backend = make(tiny_model_path, micro_batch_size=micro_batch_size)
    seqs = shared_prompt_batch()
    groups = mlx_groups.find_groups(seqs.rows(slice(0, micro_batch_size)))
    assert groups is not None and len(groups.prompts) < len(groups.owner)
    assert groups.prompt_len.tolist()[:3] == [7, 7, 7]
    whole = plain_logp("mlx", tiny_model_path, seqs)  # B = 0: policy and reference are the base model
    for reference in (False, True):
        got = backend.logprobs(seqs, reference=reference)
        np.testing.assert_allclose(got, whole, atol=1e-5)
        assert (got[seqs.attention_mask[:, 1:] == 0] == 0).all()


def test_rows_with_distinct_prompts_take_the_whole_row_forward(lora):
    seqs = shared_prompt_batch()
    assert mlx_groups.find_groups(seqs.rows(np.array([0, 3, 6]))) is None


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_shared_prompt_gradients_equal_the_whole_row_gradients(tiny_model_path, tmp_path, monkeypatch, use_lora):
    backend = make(tiny_model_path, micro_batch_size=6, model={"use_lora": use_lora})
    seqs = shared_prompt_batch()
    rng = np.random.default_rng(1)
    logp = backend.logprobs(seqs)
    batch = TrainBatch(
        sequences=seqs,
        advantages=rng.standard_normal(len(seqs)).astype(np.float32),
        token_weights=aggregation_weights(seqs.loss_mask).astype(np.float32),
        old_logp=logp + 0.1 * rng.standard_normal(logp.shape).astype(np.float32),
        ref_logp=logp - 0.05,
    )
    if use_lora:  # B != 0, so the adapters' A gradients are not trivially zero
        with_random_adapters(backend, tmp_path / "adapters", scale=0.05, seed=5)
    loss = LossSettings(kl_coef=0.1)
    calls = []
    original = mlx_groups.grouped_logp
    monkeypatch.setattr(mlx_groups, "grouped_logp", lambda *a, **k: calls.append(1) or original(*a, **k))
    shared, shared_stats = backend.gradients(batch, loss=loss)
    assert calls  # the shared-prompt forward ran
    monkeypatch.setattr(mlx_groups, "find_groups", lambda rows: None)
    whole, whole_stats = backend.gradients(batch, loss=loss)
    for key in ("loss", "pg_loss", "kl", "clip_fraction", "ratio_mean", "grad_norm"):
        assert getattr(shared_stats, key) == pytest.approx(getattr(whole_stats, key), abs=1e-6, rel=1e-5)
    assert shared.keys() == whole.keys()
    for name, g in shared.items():
        expected = whole[name]
        assert np.abs(expected).max() > 0, name
        np.testing.assert_allclose(g, expected, atol=1e-6 * max(1.0, np.abs(expected).max()), rtol=1e-4)


def test_training_with_lora_dropout_keeps_whole_rows(tiny_model_path, monkeypatch):
    backend = make(tiny_model_path, model={"lora_dropout": 0.1})
    seqs = shared_prompt_batch()
    batch = TrainBatch(
        sequences=seqs,
        advantages=np.ones(len(seqs), np.float32),
        token_weights=aggregation_weights(seqs.loss_mask).astype(np.float32),
    )
    monkeypatch.setattr(mlx_groups, "grouped_logp", lambda *a, **k: pytest.fail("a shared prompt under dropout"))
    backend.gradients(batch, loss=LossSettings())
    backend.train_step(batch, loss=LossSettings())


# ----------------------------------------------------------- merged LoRA


def test_sampling_with_lora_merged_restores_the_weights_bit_identical(tiny_model_path, tmp_path, monkeypatch):
    backend = with_random_adapters(make(tiny_model_path), tmp_path / "adapters", scale=0.2, seed=7)
    before = all_weights(backend)
    seen = []
    step = mlx_decode.forward_step

    def spy(model, ids, cache):  # inside the decode: plain Linear layers holding the merged weights
        seen.append(type(model.model.layers[0].self_attn.q_proj).__name__)
        return step(model, ids, cache)

    monkeypatch.setattr(mlx_decode, "forward_step", spy)
    completions = backend.sample(encode(backend), n=2, params=SamplingParams(max_new_tokens=8, seed=2))
    assert set(seen) == {"Linear"}
    after = all_weights(backend)  # the LoRALinear layers are back: their adapters, their base weights
    assert after.keys() == before.keys()
    for name, value in after.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    # the merged model samples what the adapters define: log-probs match the unmerged teacher-forced forward
    seqs = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
    forced = backend.logprobs(seqs)
    unadapted = backend.logprobs(seqs, reference=True)
    for i, c in enumerate(completions):
        start = len(c.prompt_ids) - 1
        np.testing.assert_allclose(c.logprobs, forced[i, start : start + len(c.logprobs)], atol=1e-4)
    assert np.abs(forced - unadapted).max() > 1e-2  # the adapters matter here


def test_merged_lora_is_restored_after_an_exception_and_skipped_on_quantised_bases(tiny_model_path, quantized_path):
    model = mlx_lora_model(tiny_model_path)
    layers = mlx_ops.lora_layers(model)
    with pytest.raises(RuntimeError, match="boom"), mlx_ops.lora_merged(model):
        assert not mlx_ops.lora_layers(model)
        raise RuntimeError("boom")
    assert mlx_ops.lora_layers(model) == layers
    quantized = mlx_lora_model(quantized_path, random_b=False)
    layers = mlx_ops.lora_layers(quantized)
    with mlx_ops.lora_merged(quantized):
        assert mlx_ops.lora_layers(quantized) == layers
