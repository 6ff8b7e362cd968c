"""The PyTorch backend on a real tiny model (CPU, no mocks, no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import TORCH_DEVICE  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from rlaif_mlx.backends.base import (  # noqa: E402
    Backend,
    LossSettings,
    SamplingParams,
    SequenceBatch,
    TrainBatch,
)
from rlaif_mlx.backends.torch import TorchBackend, create  # noqa: E402
from rlaif_mlx.backends.torch_ops import token_logp as _token_logp  # noqa: E402
from rlaif_mlx.config import ModelConfig, TrainingConfig  # noqa: E402
from rlaif_mlx.rl.advantages import compute_advantages  # noqa: E402
from rlaif_mlx.rl.objective import aggregation_weights  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\nprint(", "x"]  # different lengths on purpose


def make(path, *, seed: int = 0, total_steps: int = 20, model: dict | None = None, **training) -> TorchBackend:
    training = {"learning_rate": 1e-3, "micro_batch_size": 4, "lr_scheduler_type": "constant"} | training
    config = ModelConfig(base_model=str(path), lora_r=4, torch={"device": TORCH_DEVICE}, **(model or {}))
    return create(config, TrainingConfig(**training), seed=seed, total_steps=total_steps)


def encode(backend, texts=PROMPTS) -> list[list[int]]:
    return [backend.tokenizer.encode(t) for t in texts]


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


def grads(backend, batch: TrainBatch, loss: LossSettings = LOSS) -> dict[str, torch.Tensor]:
    """Accumulated gradients of one step's loss, without stepping the optimizer."""
    backend._accumulate_gradients(batch, loss)
    out = {n: p.grad.clone() for n, p in backend._model.named_parameters() if p.grad is not None}
    backend._optimizer.zero_grad(set_to_none=True)
    return out


def weights(backend, *, trainable: bool | None = None) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in backend._model.named_parameters()
        if trainable is None or p.requires_grad == trainable
    }


@pytest.fixture(scope="module")
def lora(tiny_model_path) -> TorchBackend:
    """A LoRA backend for read-only tests (sampling, log-probs)."""
    return make(tiny_model_path)


# ------------------------------------------------------------------ interface


def test_satisfies_backend_protocol(lora):
    assert isinstance(lora, Backend)
    assert lora.name == "torch" and lora.device == TORCH_DEVICE
    assert lora.tokenizer.convert_ids_to_tokens(lora.eos_ids[0]) == "<|im_end|>"
    assert lora.pad_id == lora.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert lora.pad_id in lora.eos_ids  # the generation config stops on it too
    trainable, total = lora.trainable_parameter_count()
    assert 0 < trainable < total


def test_options_for_mlx_are_ignored_with_a_note(tiny_model_path, caplog):
    with caplog.at_level("WARNING", logger="rlaif_mlx.backends.torch"):
        backend = make(tiny_model_path, model={"mlx": {"memory_limit_gb": 8, "cache_limit_gb": 0}})
    assert "model.mlx.memory_limit_gb, model.mlx.cache_limit_gb: MLX-only" in caplog.text
    assert backend.sample(encode(backend, ["x"]), n=1, params=SamplingParams(max_new_tokens=2))
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlaif_mlx.backends.torch"):
        make(tiny_model_path)
    assert "MLX-only" not in caplog.text


# ------------------------------------------------------------------- sampling


def test_sample_logprobs_equal_teacher_forced(lora):
    prompts = encode(lora)
    completions = lora.sample(prompts, n=3, params=SamplingParams(max_new_tokens=10, seed=1))
    assert [c.uid for c in completions] == [f"{p}-{s}" for p in range(3) for s in range(3)]
    assert all(c.prompt_ids == tuple(prompts[c.prompt_index]) for c in completions)
    seqs = SequenceBatch.from_completions(completions, pad_id=lora.pad_id)
    forced = lora.logprobs(seqs)
    for i, c in enumerate(completions):
        start = len(c.prompt_ids) - 1
        got = forced[i, start : start + len(c.completion_ids)]
        np.testing.assert_allclose(np.array(c.logprobs), got, atol=1e-4)
        assert (forced[i, start + len(c.completion_ids) :] == 0).all()  # padding targets are 0


def test_cached_decode_equals_full_forward(lora):
    # Two left-padded prompts, prefill once, then feed 5 tokens one by one.
    prompts = encode(lora, ["def add(a, b):\n    return", "y"])
    extra = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]
    lora._model.eval()
    with torch.inference_mode():
        width = max(len(p) for p in prompts)
        on = {"device": lora.device}
        ids = torch.tensor([[lora.pad_id] * (width - len(p)) + p for p in prompts], **on)
        mask = (
            torch.arange(width, **on)[None] >= torch.tensor([width - len(p) for p in prompts], **on)[:, None]
        ).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = lora._forward_step(ids, mask, pos, None)
        next_pos = pos[:, -1] + 1
        for t in range(5):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long, **on)], dim=1)
            tokens = torch.tensor([extra[0][t], extra[1][t]], **on)[:, None]
            logits, cache = lora._forward_step(tokens, mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        for row, (p, e) in enumerate(zip(prompts, extra, strict=True)):
            full = lora._model(input_ids=torch.tensor([p + e], **on)).logits[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-4, rtol=0)


def test_prompt_is_prefilled_once_per_prompt(lora):
    calls = []
    embed = lora._model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        lora.sample(encode(lora), n=4, params=SamplingParams(max_new_tokens=5, seed=0))
    finally:
        hook.remove()
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


def test_top_k_one_is_greedy(lora):
    completions = lora.sample(encode(lora), n=2, params=SamplingParams(max_new_tokens=6, top_k=1, seed=3))
    assert completions[0].completion_ids == completions[1].completion_ids
    with torch.inference_mode():
        for c in completions[::2]:
            ids = list(c.prompt_ids + c.completion_ids)
            logits = lora._model(input_ids=torch.tensor([ids], device=lora.device)).logits[0]
            start = len(c.prompt_ids) - 1
            argmax = logits[start : start + len(c.completion_ids)].argmax(-1).tolist()
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
    base_stats = backend._accumulate_gradients(batch, LOSS)
    base_grads = {n: p.grad.clone() for n, p in backend._model.named_parameters() if p.grad is not None}
    backend._optimizer.zero_grad(set_to_none=True)

    # garbage in old/ref log-probs where the weights are 0 (prompt and padding targets)
    off = batch.token_weights == 0
    noisy = TrainBatch(
        sequences=batch.sequences,
        advantages=batch.advantages,
        token_weights=batch.token_weights,
        old_logp=np.where(off, -1e4, backend.logprobs(batch.sequences)),
        ref_logp=np.where(off, 123.0, batch.ref_logp),
    )
    # more padding columns with different pad ids change nothing either
    s = batch.sequences
    pad = 5
    padded_seqs = SequenceBatch(
        input_ids=np.pad(np.where(s.attention_mask == 1, s.input_ids, 77), ((0, 0), (0, pad)), constant_values=9),
        attention_mask=np.pad(s.attention_mask, ((0, 0), (0, pad))),
        loss_mask=np.pad(s.loss_mask, ((0, 0), (0, pad))),
    )
    padded = TrainBatch(
        sequences=padded_seqs,
        advantages=batch.advantages,
        token_weights=np.pad(batch.token_weights, ((0, 0), (0, pad))),
        ref_logp=np.pad(batch.ref_logp, ((0, 0), (0, pad)), constant_values=-50.0),
    )
    for variant in (noisy, padded):
        stats = backend._accumulate_gradients(variant, LOSS)
        assert stats["loss"] == pytest.approx(base_stats["loss"], abs=1e-6)
        assert stats["kl"] == pytest.approx(base_stats["kl"], abs=1e-6)
        for n, p in backend._model.named_parameters():
            if n in base_grads:
                torch.testing.assert_close(p.grad, base_grads[n], atol=1e-6, rtol=1e-5)
        backend._optimizer.zero_grad(set_to_none=True)


def test_micro_batches_give_the_full_batch_update(tiny_model_path):
    small = make(tiny_model_path, micro_batch_size=2, model={"use_lora": False})
    whole = make(tiny_model_path, micro_batch_size=64, model={"use_lora": False})
    batch = train_batch(whole)
    g_small, g_whole = grads(small, batch), grads(whole, batch)
    assert g_small.keys() == g_whole.keys() and g_small
    for n in g_whole:
        torch.testing.assert_close(g_small[n], g_whole[n], atol=1e-6, rtol=1e-4)
    before = weights(whole)
    s_small, s_whole = small.train_step(batch, loss=LOSS), whole.train_step(batch, loss=LOSS)
    assert s_small.extra["micro_batches"] == 5 and s_whole.extra["micro_batches"] == 1
    for key in ("loss", "pg_loss", "kl", "clip_fraction", "ratio_mean", "grad_norm"):
        assert getattr(s_small, key) == pytest.approx(getattr(s_whole, key), abs=1e-6)
    w_small, w_whole = weights(small), weights(whole)
    for n in w_whole:
        # Adam's first step is ~lr * g / (|g| + eps): where |g| is near eps, float noise
        # in g moves it, so compare the weights where the gradient is well above eps.
        clear = g_whole[n].abs() > 1e-5
        assert clear.any(), n
        torch.testing.assert_close(w_small[n][clear], w_whole[n][clear], atol=1e-6, rtol=0)
        assert (w_small[n] - w_whole[n]).abs().max() <= 0.1 * 1e-3
        assert not torch.equal(w_whole[n][clear], before[n][clear])


def test_learning_rate_schedule_and_override(tiny_model_path):
    backend = make(tiny_model_path, learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", total_steps=4)
    batch = train_batch(backend)
    assert backend.train_step(batch, loss=LOSS, learning_rate=5e-4).lr == 5e-4  # does not advance
    lrs = [backend.train_step(batch, loss=LOSS).lr for _ in range(4)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


# ----------------------------------------------------------- LoRA / full FT


def test_lora_trains_adapters_only_and_reference_is_the_base(tiny_model_path):
    backend = make(tiny_model_path, learning_rate=1e-2)
    batch = train_batch(backend)
    frozen = weights(backend, trainable=False)
    assert frozen and all("lora_" not in n for n in frozen)
    assert all("lora_" in n for n in weights(backend, trainable=True))
    before_policy = backend.logprobs(batch.sequences)

    g = grads(backend, batch)
    assert all("lora_" in n for n in g)
    assert all(g[n].abs().sum() > 0 for n in g if "lora_B" in n)
    assert all(g[n].abs().sum() == 0 for n in g if "lora_A" in n)  # B starts at 0

    for _ in range(3):
        backend.train_step(batch, loss=LOSS)
    g = grads(backend, batch)
    assert all(g[n].abs().sum() > 0 for n in g)  # A and B both learn once B != 0
    for n, w in weights(backend, trainable=False).items():
        assert torch.equal(w, frozen[n]), n

    policy = backend.logprobs(batch.sequences)
    reference = backend.logprobs(batch.sequences, reference=True)
    assert np.abs(policy - reference).max() > 1e-3
    np.testing.assert_allclose(reference, before_policy, atol=1e-5)  # adapters off == the base model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.as_tensor(batch.sequences.input_ids)
        base_logp = _token_logp(base, ids, torch.as_tensor(batch.sequences.attention_mask)).numpy()
    np.testing.assert_allclose(reference, base_logp, atol=1e-5)


def test_full_finetune_changes_weights_not_reference(tiny_model_path):
    backend = make(tiny_model_path, model={"use_lora": False})
    trainable, total = backend.trainable_parameter_count()
    assert trainable == total
    batch = train_batch(backend)
    before = weights(backend)
    ref_before = {n: p.detach().clone() for n, p in backend._reference.named_parameters()}
    start_logp = backend.logprobs(batch.sequences)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS)
    after = weights(backend)
    assert all(not torch.equal(after[n], before[n]) for n in before)
    for n, p in backend._reference.named_parameters():
        assert not p.requires_grad and torch.equal(p, ref_before[n])
    np.testing.assert_allclose(backend.logprobs(batch.sequences, reference=True), start_logp, atol=1e-6)
    assert np.abs(backend.logprobs(batch.sequences) - start_logp).max() > 1e-3


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_rebase_reference_makes_the_policy_the_reference(tiny_model_path, tmp_path, use_lora):
    backend = make(tiny_model_path, learning_rate=1e-2, model={"use_lora": use_lora})
    batch = train_batch(backend)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS, learning_rate=1e-2)
    policy = backend.logprobs(batch.sequences)
    assert np.abs(backend.logprobs(batch.sequences, reference=True) - policy).max() > 1e-3
    backend.rebase_reference()
    assert not backend._optimizer.state  # a fresh optimizer
    np.testing.assert_allclose(backend.logprobs(batch.sequences), policy, atol=1e-5)
    np.testing.assert_allclose(backend.logprobs(batch.sequences, reference=True), policy, atol=1e-5)
    if use_lora:
        assert all(torch.equal(w, torch.zeros_like(w)) for n, w in weights(backend).items() if "lora_B" in n)
    # training moves away from the new reference; a checkpoint keeps the new reference
    backend.train_step(batch, loss=LOSS)
    backend.save(tmp_path / "ckpt")
    policy, reference = backend.logprobs(batch.sequences), backend.logprobs(batch.sequences, reference=True)
    resumed = make(tiny_model_path, model={"use_lora": use_lora})
    resumed.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(resumed.logprobs(batch.sequences), policy)
    np.testing.assert_array_equal(resumed.logprobs(batch.sequences, reference=True), reference)
    backend.export(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.inference_mode():
        ids, attn = (torch.as_tensor(a) for a in (batch.sequences.input_ids, batch.sequences.attention_mask))
        np.testing.assert_allclose(_token_logp(exported, ids, attn).numpy(), policy, atol=1e-5)


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

    other = make(tiny_model_path, model={"use_lora": not use_lora})
    with pytest.raises(ValueError, match="use_lora"):
        other.load(tmp_path / "ckpt")

    resumed = make(tiny_model_path, seed=123, model=model, lr_scheduler_type="cosine", warmup_steps=1, total_steps=6)
    resumed.load(tmp_path / "ckpt")
    got = resumed.train_step(batch, loss=LOSS)
    assert (got.loss, got.grad_norm, got.lr) == (expected.loss, expected.grad_norm, expected.lr)
    for n, w in weights(resumed, trainable=True).items():
        assert torch.equal(w, expected_weights[n]), n
    again = resumed.sample(encode(resumed), n=2, params=SamplingParams(max_new_tokens=4))
    assert [c.completion_ids for c in again] == [c.completion_ids for c in expected_sample]


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_export_round_trip(tiny_model_path, tmp_path, use_lora):
    backend = make(tiny_model_path, learning_rate=1e-2, model={"use_lora": use_lora})
    batch = train_batch(backend)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS)
    policy = backend.logprobs(batch.sequences)
    rng = torch.get_rng_state()
    backend.export(tmp_path / "export")
    assert torch.equal(torch.get_rng_state(), rng)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in exported.named_parameters())
    with torch.inference_mode():
        ids = torch.as_tensor(batch.sequences.input_ids)
        got = _token_logp(exported, ids, torch.as_tensor(batch.sequences.attention_mask)).numpy()
    np.testing.assert_allclose(got, policy, atol=1e-5)
    # the live policy keeps its adapters
    np.testing.assert_allclose(backend.logprobs(batch.sequences), policy, atol=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tokenizer.encode("def f(x):") == backend.tokenizer.encode("def f(x):")


# ------------------------------------------------------------------ learning


TARGET = range(100, 164)  # 64 of ~1024 token ids: chance is ~1/16


@pytest.mark.parametrize(("use_lora", "lr"), [(True, 1e-2), (False, 3e-3)], ids=["lora", "full"])
def test_rl_loop_learns_a_toy_reward(tiny_model_path, use_lora, lr):
    """Reward = fraction of completion tokens in TARGET; the mean reward must rise well above chance.

    Sampling runs at a low temperature: the random tiny model's logits span only
    about +-2.6 (tied embeddings of norm ~0.23, unit-gain final norm), which caps
    what a LoRA on the attention projections can express at temperature 1.
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
