"""The MLX backend on a real tiny model (CPU, no mocks, no network). Parity with torch: test_cross_backend.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.utils import load as mlx_lm_load  # noqa: E402

from rlaif_mlx.backends.base import (  # noqa: E402
    Backend,
    LossSettings,
    SamplingParams,
    SequenceBatch,
    TrainBatch,
)
from rlaif_mlx.backends.mlx import MlxBackend, create  # noqa: E402
from rlaif_mlx.backends.mlx_ops import token_logp as _token_logp  # noqa: E402
from rlaif_mlx.config import ModelConfig, TrainingConfig  # noqa: E402
from rlaif_mlx.rl.advantages import compute_advantages  # noqa: E402
from rlaif_mlx.rl.objective import aggregation_weights  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\nprint(", "x"]  # different lengths on purpose


def make(path, *, seed: int = 0, total_steps: int = 20, model: dict | None = None, **training) -> MlxBackend:
    training = {"learning_rate": 1e-3, "micro_batch_size": 4, "lr_scheduler_type": "constant"} | training
    config = ModelConfig(base_model=str(path), lora_r=4, **(model or {}))
    return create(config, TrainingConfig(**training), seed=seed, total_steps=total_steps)


def encode(backend, texts=PROMPTS) -> list[list[int]]:
    return [backend.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def train_batch(backend, *, seed: int = 0, n: int = 3, max_new_tokens: int = 6) -> TrainBatch:
    """A fixed batch from real samples, with deterministic advantages and KL terms."""
    completions = backend.sample(encode(backend), n=n, params=SamplingParams(max_new_tokens=max_new_tokens, seed=seed))
    seqs = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
    rng = np.random.default_rng(seed)
    return TrainBatch(
        sequences=seqs,
        advantages=rng.standard_normal(len(seqs)).astype(np.float32),
        token_weights=aggregation_weights(seqs.loss_mask).astype(np.float32),
        ref_logp=backend.logprobs(seqs, reference=True),
    )


LOSS = LossSettings(kl_coef=0.1)


def grads(backend, batch: TrainBatch, loss: LossSettings = LOSS) -> dict[str, np.ndarray]:
    """Accumulated gradients of one step's loss, without stepping the optimizer."""
    total, _ = backend._accumulate_gradients(batch, loss)
    return {n: np.array(g) for n, g in tree_flatten(total)}


def weights(backend, *, trainable: bool | None = None) -> dict[str, np.ndarray]:
    everything = dict(tree_flatten(backend._model.parameters()))
    train = dict(tree_flatten(backend._model.trainable_parameters()))
    return {n: np.array(v) for n, v in everything.items() if trainable is None or (n in train) == trainable}


def base_logp(path, seqs: SequenceBatch) -> np.ndarray:
    """Log-probs of the untouched model on disk, loaded by plain mlx-lm."""
    model, _ = mlx_lm_load(str(path))
    return np.array(_token_logp(model, mx.array(seqs.input_ids.astype(np.int32)), mx.array(seqs.attention_mask)))


@pytest.fixture(scope="module")
def lora(tiny_model_path) -> MlxBackend:
    """A LoRA backend for read-only tests (sampling, log-probs)."""
    return make(tiny_model_path)


# ------------------------------------------------------------------ interface


def test_satisfies_backend_protocol(lora):
    assert isinstance(lora, Backend)
    assert lora.name == "mlx" and lora.device in ("cpu", "gpu")
    assert lora.tokenizer.convert_ids_to_tokens(lora.eos_ids[0]) == "<|im_end|>"
    assert lora.pad_id == lora.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert lora.eos_ids == (2, 0) and lora.pad_id == 0
    assert lora.tokenizer.decode(encode(lora, ["def f(x):"])[0]) == "def f(x):"
    assert lora.tokenizer.chat_template
    trainable, total = lora.trainable_parameter_count()
    assert 0 < trainable < total


def test_options_for_torch_are_ignored_with_a_note_and_the_memory_limit_is_set(tiny_model_path, caplog):
    previous = mx.set_memory_limit(mx.get_memory_limit())
    previous_cache = mx.set_cache_limit(2**40)
    try:
        with caplog.at_level("WARNING", logger="rlaif_mlx.backends.mlx"):
            backend = make(
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


def test_missing_mlx_names_the_pip_command():
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'mlx', 'mlx_lm'}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from rlaif_mlx.backends.base import BackendUnavailable\n"
        "try:\n"
        "    import rlaif_mlx.backends.mlx\n"
        "except BackendUnavailable as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'rlaif-mlx[mlx]'" in result.stdout


# ------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=10, seed=1),
        SamplingParams(max_new_tokens=10, seed=(1, 2, 3), temperature=0.7, top_k=40, top_p=0.9, min_p=0.02),
        SamplingParams(max_new_tokens=10, temperature=0.0),
    ],
    ids=["plain", "filtered", "greedy"],
)
def test_sample_logprobs_equal_teacher_forced(lora, params):
    prompts = encode(lora)
    completions = lora.sample(prompts, n=3, params=params)
    assert [c.uid for c in completions] == [f"{p}-{s}" for p in range(3) for s in range(3)]
    assert all(c.prompt_ids == tuple(prompts[c.prompt_index]) for c in completions)
    seqs = SequenceBatch.from_completions(completions, pad_id=lora.pad_id)
    forced = lora.logprobs(seqs)
    for i, c in enumerate(completions):
        start = len(c.prompt_ids) - 1
        got = forced[i, start : start + len(c.completion_ids)]
        np.testing.assert_allclose(np.array(c.logprobs), got, atol=1e-4)
        assert (forced[i, start + len(c.completion_ids) :] == 0).all()  # padding targets are 0


def test_left_padded_cached_decode_equals_full_forward(lora):
    # BatchKVCache offsets RoPE per row: a left-padded row decodes as if unpadded.
    from rlaif_mlx.backends.mlx_ops import batch_cache as _batch_cache
    from rlaif_mlx.backends.mlx_ops import left_pad as _left_pad

    prompts = encode(lora, ["def add(a, b):\n    return", "y"])
    extra = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]
    ids, padding = _left_pad(prompts, pad_id=lora.pad_id)
    assert padding[0] == 0 and padding[1] > 0
    cache = _batch_cache(lora._model, padding)
    logits = lora._forward_step(ids, cache)
    for t in range(5):
        logits = lora._forward_step(mx.array([[extra[0][t]], [extra[1][t]]]), cache)
    for row, (p, e) in enumerate(zip(prompts, extra, strict=True)):
        full = lora._model(mx.array([p + e]))[0, -1]
        np.testing.assert_allclose(np.array(logits[row]), np.array(full), atol=1e-4)


def test_prompt_is_prefilled_once_per_prompt(lora, monkeypatch):
    calls = []
    forward = lora._forward_step
    monkeypatch.setattr(lora, "_forward_step", lambda ids, cache: calls.append(tuple(ids.shape)) or forward(ids, cache))
    lora.sample(encode(lora), n=4, params=SamplingParams(max_new_tokens=5, seed=0))
    width = max(len(p) for p in encode(lora))
    assert calls[0] == (3, width)  # one prefill for the 3 prompts, not 12
    assert all(shape == (12, 1) for shape in calls[1:])  # then one token per row per step
    assert len(calls) <= 5


def test_seeded_sampling_is_reproducible(lora):
    params = SamplingParams(max_new_tokens=8, seed=7, top_p=0.9, top_k=50, min_p=0.01)
    first = lora.sample(encode(lora), n=2, params=params)
    again = lora.sample(encode(lora), n=2, params=params)
    other = lora.sample(encode(lora), n=2, params=SamplingParams(max_new_tokens=8, seed=8, top_p=0.9, top_k=50))
    assert [c.completion_ids for c in first] == [c.completion_ids for c in again]
    assert [c.completion_ids for c in first] != [c.completion_ids for c in other]
    # the samples of one prompt differ from each other (the shared cache is not a shared sample)
    assert first[0].completion_ids != first[1].completion_ids


def test_filters_keep_only_allowed_tokens(lora):
    from rlaif_mlx.backends.mlx_ops import choose as _choose

    logits = mx.array([[0.0, 3.0, 2.0, 1.0, -1.0]] * 512)
    u = mx.random.uniform(shape=(512,), key=mx.random.key(0))
    seen = lambda params: set(_choose(logits, params, u)[0].tolist())  # noqa: E731
    assert seen(SamplingParams(top_k=2)) == {1, 2}
    assert seen(SamplingParams(top_p=0.5)) == {1}  # p(1) ~ 0.64 covers 0.5 alone
    assert seen(SamplingParams(top_p=0.9)) == {1, 2, 3}  # 0.64 + 0.24 < 0.9: the third token is needed
    assert seen(SamplingParams(min_p=0.3)) == {1, 2}  # p(2)/p(1) = e^-1 ~ 0.37; p(3)/p(1) ~ 0.14
    assert seen(SamplingParams(temperature=0.0)) == {1}
    assert seen(SamplingParams()) == {0, 1, 2, 3, 4}


def test_top_k_one_is_greedy(lora):
    completions = lora.sample(encode(lora), n=2, params=SamplingParams(max_new_tokens=6, top_k=1, seed=3))
    assert completions[0].completion_ids == completions[1].completion_ids
    for c in completions[::2]:
        ids = list(c.prompt_ids + c.completion_ids)
        logits = lora._model(mx.array([ids]))[0]
        start = len(c.prompt_ids) - 1
        argmax = mx.argmax(logits[start : start + len(c.completion_ids)], axis=-1).tolist()
        assert argmax == list(c.completion_ids)
        assert c.finish_reason == "length" and len(c.completion_ids) == 6


def test_max_new_tokens_and_length_reason(lora):
    completions = lora.sample(encode(lora), n=3, params=SamplingParams(max_new_tokens=4, seed=0))
    for c in completions:
        assert len(c.completion_ids) == len(c.logprobs) <= 4
        assert c.finish_reason == ("eos" if c.completion_ids[-1] in lora.eos_ids else "length")


def test_eos_ends_a_completion_and_is_kept_out_of_the_text(tiny_model_path):
    backend = make(tiny_model_path)
    greedy = SamplingParams(max_new_tokens=8, top_k=1)
    ids = backend.sample(encode(backend, ["x"]), n=1, params=greedy)[0].completion_ids
    backend.eos_ids = (ids[3],)  # make the 4th greedy token the EOS
    (c,) = backend.sample(encode(backend, ["x"]), n=1, params=greedy)
    end = ids.index(ids[3]) + 1
    assert c.finish_reason == "eos" and c.completion_ids == ids[:end]
    assert c.text == backend.tokenizer.decode(list(ids[: end - 1]))


def test_stop_string_cuts_the_text(lora):
    greedy = SamplingParams(max_new_tokens=12, top_k=1)
    ids = lora.sample(encode(lora, ["x"]), n=1, params=greedy)[0].completion_ids
    full = lora.tokenizer.decode(list(ids))
    stop = next(full[i : i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    k = next(k for k in range(1, len(ids) + 1) if stop in lora.tokenizer.decode(list(ids[:k])))
    (c,) = lora.sample(encode(lora, ["x"]), n=1, params=SamplingParams(max_new_tokens=12, top_k=1, stop=(stop,)))
    assert c.finish_reason == "stop"
    assert c.completion_ids == ids[:k]  # up to and including the token that completed the stop string
    assert c.text == full[: full.find(stop)]
    assert stop not in c.text


# ------------------------------------------------------------------- the loss


def test_loss_ignores_prompt_and_padding(tiny_model_path):
    backend = make(tiny_model_path)
    batch = train_batch(backend)
    base_grads, base_stats = backend._accumulate_gradients(batch, LOSS)
    base_grads = dict(tree_flatten(base_grads))

    off = batch.token_weights == 0
    noisy = TrainBatch(
        sequences=batch.sequences,
        advantages=batch.advantages,
        token_weights=batch.token_weights,
        old_logp=np.where(off, -1e4, backend.logprobs(batch.sequences)),
        ref_logp=np.where(off, 123.0, batch.ref_logp),
    )
    s, pad = batch.sequences, 5
    padded = TrainBatch(
        sequences=SequenceBatch(
            input_ids=np.pad(np.where(s.attention_mask == 1, s.input_ids, 77), ((0, 0), (0, pad)), constant_values=9),
            attention_mask=np.pad(s.attention_mask, ((0, 0), (0, pad))),
            loss_mask=np.pad(s.loss_mask, ((0, 0), (0, pad))),
        ),
        advantages=batch.advantages,
        token_weights=np.pad(batch.token_weights, ((0, 0), (0, pad))),
        ref_logp=np.pad(batch.ref_logp, ((0, 0), (0, pad)), constant_values=-50.0),
    )
    for variant in (noisy, padded):
        got, stats = backend._accumulate_gradients(variant, LOSS)
        assert stats["loss"] == pytest.approx(base_stats["loss"], abs=1e-6)
        assert stats["kl"] == pytest.approx(base_stats["kl"], abs=1e-6)
        for n, g in tree_flatten(got):
            np.testing.assert_allclose(np.array(g), np.array(base_grads[n]), atol=1e-6, rtol=1e-5)


def test_micro_batches_give_the_full_batch_update(tiny_model_path):
    small = make(tiny_model_path, micro_batch_size=2, model={"use_lora": False})
    whole = make(tiny_model_path, micro_batch_size=64, model={"use_lora": False})
    batch = train_batch(whole)
    g_small, g_whole = grads(small, batch), grads(whole, batch)
    assert g_small.keys() == g_whole.keys() and g_small
    for n in g_whole:
        np.testing.assert_allclose(g_small[n], g_whole[n], atol=1e-6, rtol=1e-4)
    before = weights(whole)
    s_small, s_whole = small.train_step(batch, loss=LOSS), whole.train_step(batch, loss=LOSS)
    assert s_small.extra["micro_batches"] == 5 and s_whole.extra["micro_batches"] == 1
    for key in ("loss", "pg_loss", "kl", "clip_fraction", "ratio_mean", "grad_norm"):
        assert getattr(s_small, key) == pytest.approx(getattr(s_whole, key), abs=1e-6)
    w_small, w_whole = weights(small), weights(whole)
    for n in w_whole:
        clear = np.abs(g_whole[n]) > 1e-5  # Adam's first step amplifies float noise where |g| ~ eps
        assert clear.any(), n
        np.testing.assert_allclose(w_small[n][clear], w_whole[n][clear], atol=1e-6, rtol=0)
        assert np.abs(w_small[n] - w_whole[n]).max() <= 0.1 * 1e-3
        assert not np.array_equal(w_whole[n][clear], before[n][clear])


def test_learning_rate_schedule_and_override(tiny_model_path):
    backend = make(tiny_model_path, learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", total_steps=4)
    batch = train_batch(backend)
    assert backend.train_step(batch, loss=LOSS, learning_rate=5e-4).lr == 5e-4  # does not advance
    lrs = [backend.train_step(batch, loss=LOSS).lr for _ in range(4)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_nonfinite_gradient_skips_the_update(tiny_model_path):
    backend = make(tiny_model_path, model={"use_lora": False})
    batch = train_batch(backend)
    batch.advantages[0] = np.nan
    before = weights(backend)
    stats = backend.train_step(batch, loss=LOSS)
    assert not np.isfinite(stats.grad_norm) and stats.extra["skipped_nonfinite"] == 1.0
    for n, w in weights(backend).items():
        np.testing.assert_array_equal(w, before[n])


# ----------------------------------------------------------- LoRA / full FT


def test_lora_trains_adapters_only_and_reference_is_the_base(tiny_model_path):
    backend = make(tiny_model_path, learning_rate=1e-2)
    batch = train_batch(backend)
    frozen = weights(backend, trainable=False)
    assert frozen and all("lora_" not in n for n in frozen)
    trainable = weights(backend, trainable=True)
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-2] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    before_policy = backend.logprobs(batch.sequences)

    g = grads(backend, batch)
    assert g.keys() == trainable.keys()
    assert all(np.abs(g[n]).sum() > 0 for n in g if "lora_b" in n)
    assert all(np.abs(g[n]).sum() == 0 for n in g if "lora_a" in n)  # B starts at 0

    for _ in range(3):
        backend.train_step(batch, loss=LOSS)
    g = grads(backend, batch)
    assert all(np.abs(g[n]).sum() > 0 for n in g)  # A and B both learn once B != 0
    for n, w in weights(backend, trainable=False).items():
        np.testing.assert_array_equal(w, frozen[n], err_msg=n)

    policy = backend.logprobs(batch.sequences)
    reference = backend.logprobs(batch.sequences, reference=True)
    assert np.abs(policy - reference).max() > 1e-3
    np.testing.assert_allclose(reference, before_policy, atol=1e-5)  # adapters off == the base model
    np.testing.assert_allclose(reference, base_logp(tiny_model_path, batch.sequences), atol=1e-5)
    assert np.abs(backend.logprobs(batch.sequences) - policy).max() == 0  # the adapters are back on


def test_full_finetune_changes_weights_not_reference(tiny_model_path):
    backend = make(tiny_model_path, model={"use_lora": False})
    trainable, total = backend.trainable_parameter_count()
    assert trainable == total
    batch = train_batch(backend)
    before = weights(backend)
    ref_before = {n: np.array(v) for n, v in tree_flatten(backend._reference.parameters())}
    assert not tree_flatten(backend._reference.trainable_parameters())
    start_logp = backend.logprobs(batch.sequences)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS)
    after = weights(backend)
    assert all(not np.array_equal(after[n], before[n]) for n in before)
    for n, v in tree_flatten(backend._reference.parameters()):
        np.testing.assert_array_equal(np.array(v), ref_before[n])
    np.testing.assert_allclose(backend.logprobs(batch.sequences, reference=True), start_logp, atol=1e-6)
    assert np.abs(backend.logprobs(batch.sequences) - start_logp).max() > 1e-3


def hf_logp(path, seqs: SequenceBatch) -> np.ndarray:
    """Log-probs of a Hugging Face folder loaded by transformers (the export's real consumer)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from rlaif_mlx.backends.torch_ops import token_logp as torch_token_logp

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids, attn = (torch.as_tensor(a) for a in (seqs.input_ids, seqs.attention_mask))
        return torch_token_logp(model, ids, attn).numpy()


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_rebase_reference_makes_the_policy_the_reference(tiny_model_path, tmp_path, use_lora):
    backend = make(tiny_model_path, learning_rate=1e-2, model={"use_lora": use_lora})
    batch = train_batch(backend)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS, learning_rate=1e-2)
    policy = backend.logprobs(batch.sequences)
    assert np.abs(backend.logprobs(batch.sequences, reference=True) - policy).max() > 1e-3
    backend.rebase_reference()
    state = backend._optimizer.state  # a fresh optimizer: no moments, step 0
    assert set(state) == {"step", "learning_rate"} and state["step"].item() == 0
    np.testing.assert_allclose(backend.logprobs(batch.sequences), policy, atol=1e-5)
    np.testing.assert_allclose(backend.logprobs(batch.sequences, reference=True), policy, atol=1e-5)
    if use_lora:
        assert all(not w.any() for n, w in weights(backend).items() if "lora_b" in n)
    # training moves away from the new reference; a checkpoint keeps the new reference
    backend.train_step(batch, loss=LOSS)
    backend.save(tmp_path / "ckpt")
    policy, reference = backend.logprobs(batch.sequences), backend.logprobs(batch.sequences, reference=True)
    resumed = make(tiny_model_path, model={"use_lora": use_lora})
    resumed.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(resumed.logprobs(batch.sequences), policy)
    np.testing.assert_array_equal(resumed.logprobs(batch.sequences, reference=True), reference)
    backend.export(tmp_path / "export")
    np.testing.assert_allclose(hf_logp(tmp_path / "export", batch.sequences), policy, atol=1e-5)


# --------------------------------------------------------- save/load, export


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_save_load_resumes_exactly(tiny_model_path, tmp_path, use_lora):
    model = {"use_lora": use_lora, "lora_dropout": 0.1}  # dropout: the RNG state must resume too
    first = make(tiny_model_path, model=model, lr_scheduler_type="cosine", warmup_steps=1, total_steps=6)
    batch = train_batch(first)
    for _ in range(2):
        first.train_step(batch, loss=LOSS)
    first.save(tmp_path / "ckpt")
    expected = first.train_step(batch, loss=LOSS)
    expected_weights = weights(first, trainable=True)
    expected_sample = first.sample(encode(first), n=2, params=SamplingParams(max_new_tokens=4))

    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    weight_file = "adapter_model.safetensors" if use_lora else "model.safetensors"
    assert {weight_file, "optimizer.safetensors", "backend_state.json"} <= names
    state = json.loads((tmp_path / "ckpt" / "backend_state.json").read_text())
    assert state["step"] == 2 and state["use_lora"] == use_lora and state["rebased"] is False

    resumed = make(tiny_model_path, seed=123, model=model, lr_scheduler_type="cosine", warmup_steps=1, total_steps=6)
    resumed.load(tmp_path / "ckpt")
    got = resumed.train_step(batch, loss=LOSS)
    assert (got.loss, got.grad_norm, got.lr) == (expected.loss, expected.grad_norm, expected.lr)
    for n, w in weights(resumed, trainable=True).items():
        np.testing.assert_array_equal(w, expected_weights[n], err_msg=n)
    again = resumed.sample(encode(resumed), n=2, params=SamplingParams(max_new_tokens=4))
    assert [c.completion_ids for c in again] == [c.completion_ids for c in expected_sample]

    other = make(tiny_model_path, model={"use_lora": not use_lora})
    with pytest.raises(ValueError, match="use_lora"):
        other.load(tmp_path / "ckpt")


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_export_round_trip(tiny_model_path, tmp_path, use_lora):
    backend = make(tiny_model_path, learning_rate=1e-2, model={"use_lora": use_lora})
    batch = train_batch(backend)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS)
    policy = backend.logprobs(batch.sequences)
    backend.export(tmp_path / "export")

    # mlx-lm loads it as a plain model ...
    model, _ = mlx_lm_load(str(tmp_path / "export"))
    assert not any("lora" in n for n, _ in tree_flatten(model.parameters()))
    np.testing.assert_allclose(base_logp(tmp_path / "export", batch.sequences), policy, atol=1e-5)
    # ... and so does transformers
    np.testing.assert_allclose(hf_logp(tmp_path / "export", batch.sequences), policy, atol=1e-5)
    # the live policy keeps its adapters
    np.testing.assert_array_equal(backend.logprobs(batch.sequences), policy)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tokenizer.encode("def f(x):") == backend.tokenizer.encode("def f(x):")


# ------------------------------------------------------------------ learning


TARGET = range(100, 164)  # 64 of ~1024 token ids: chance is ~1/16


@pytest.mark.parametrize(("use_lora", "lr"), [(True, 1e-2), (False, 3e-3)], ids=["lora", "full"])
def test_rl_loop_learns_a_toy_reward(tiny_model_path, use_lora, lr):
    """Reward = fraction of completion tokens in TARGET; the mean reward must rise well above chance.

    Low temperature, as in the torch test: the random tiny model's logits span only about +-2.6.
    """
    backend = make(tiny_model_path, learning_rate=lr, micro_batch_size=16, model={"use_lora": use_lora})
    prompts = encode(backend, ["def f(x):", "import os\n", "class A:", "# sum"])
    means = []
    for step in range(20):
        completions = backend.sample(
            prompts, n=8, params=SamplingParams(max_new_tokens=8, temperature=0.2, seed=1000 + step)
        )
        rewards = np.array([np.mean([t in TARGET for t in c.completion_ids]) for c in completions])
        advantages = compute_advantages(rewards.reshape(len(prompts), 8), scale_by_std=True).advantages
        seqs = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
        batch = TrainBatch(
            sequences=seqs,
            advantages=advantages.reshape(-1).astype(np.float32),
            token_weights=aggregation_weights(seqs.loss_mask).astype(np.float32),
        )
        backend.train_step(batch, loss=LossSettings())
        means.append(float(rewards.mean()))
    chance = len(TARGET) / len(backend.tokenizer)
    assert means[0] < 2 * chance, means
    assert np.mean(means[-5:]) > 3 * chance, means
