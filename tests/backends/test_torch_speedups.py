"""The PyTorch backend's fast paths, each checked against the plain computation it replaces.

Real tiny model on the CPU (``tiny_model_path``), no mocked model: batched inverse-CDF
sampling, sampling with LoRA merged into the weights, fused AdamW, and the
shared-prompt, completion-only log-prob forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from backend_helpers import LOSS, encode, make, train_batch, with_random_adapters  # noqa: E402
from conftest import TORCH_DEVICE  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from rlaif_mlx.backends import torch_decode, torch_load  # noqa: E402
from rlaif_mlx.backends import torch_forward as fwd  # noqa: E402
from rlaif_mlx.backends import torch_ops as ops  # noqa: E402
from rlaif_mlx.backends.base import Completion, SamplingParams, SequenceBatch  # noqa: E402
from rlaif_mlx.config import ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def lora(tiny_model_path):
    return make("torch", tiny_model_path)


def policy_model(path, *, use_lora: bool = True):
    """The policy model as the backend loads it, held by the test; under LoRA with random B (it starts at 0)."""
    config = ModelConfig(base_model=str(path), lora_r=4, use_lora=use_lora)
    model = torch_load.load_policy(config, device=TORCH_DEVICE, seed=0).model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


# ------------------------------------------------------------ batched draw


def test_the_batched_draw_follows_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.1, 0.25, 0.6, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(40_000, -1).contiguous()
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    counts = torch.bincount(ops.choose(logits, SamplingParams(), generators), minlength=5).float()
    np.testing.assert_allclose((counts / counts.sum()).numpy(), probs.numpy(), atol=0.01)
    # top-k 2 leaves tokens 2 and 3 only, in the ratio 0.25 : 0.6
    picked = ops.choose(logits, SamplingParams(top_k=2), generators)
    assert set(picked.unique().tolist()) == {2, 3}
    assert (picked == 3).float().mean().item() == pytest.approx(0.6 / 0.85, abs=0.01)


def test_a_filtered_out_token_is_never_drawn_even_at_the_top_of_the_range(monkeypatch):
    # u at the top of the range (1.0: a device generator that includes it, or rounding): the threshold
    # u * total reaches the total, above which only the last tokens lie, and they have probability 0.
    logits = torch.tensor([[0.0, 1.0, 2.0, -1e9, -1e9]] * 8)
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n))
    assert ops.choose(logits, SamplingParams(top_k=3), [torch.Generator()]).tolist() == [2] * 8
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.zeros(n))
    assert ops.choose(logits, SamplingParams(top_k=3), [torch.Generator()]).tolist() == [0] * 8


def test_each_prompt_samples_from_its_own_seed(lora):
    prompts = encode(lora)
    params = SamplingParams(max_new_tokens=6, seed=(11, 12, 13), top_p=0.95)
    together = lora.sample(prompts, n=3, params=params)
    for i, seed in enumerate(params.seed):
        alone = lora.sample([prompts[i]], n=3, params=SamplingParams(max_new_tokens=6, seed=(seed,), top_p=0.95))
        assert [c.completion_ids for c in alone] == [c.completion_ids for c in together[3 * i : 3 * i + 3]]
        # the log-probs differ only by float rounding (the batch's padding changes the matmul shapes)
        np.testing.assert_allclose(
            [c.logprobs for c in alone], [c.logprobs for c in together[3 * i : 3 * i + 3]], atol=1e-5
        )
    assert len({c.completion_ids for c in together[:3]}) > 1  # a prompt's samples differ from each other


# ---------------------------------------------------------- merged LoRA sampling


@pytest.fixture
def trained_lora(tiny_model_path, tmp_path):
    """LoRA with non-zero adapters (B starts at 0, which would make merging a no-op)."""
    return with_random_adapters(make("torch", tiny_model_path), tmp_path / "adapters")


def all_weights(backend) -> dict[str, np.ndarray]:
    return backend.parameters() | backend.parameters(which="frozen")


def assert_adapters_train(backend) -> None:
    """Every adapter matrix is still trainable and gets a gradient (B != 0, so A's is non-zero too)."""
    grads, _ = backend.gradients(train_batch(backend), loss=LOSS)
    assert grads.keys() == backend.parameters().keys() and grads
    assert all(np.abs(g).sum() > 0 for g in grads.values())


def test_merged_lora_sampling_equals_the_adapters_and_restores_the_weights_bit_for_bit(
    trained_lora, tiny_model_path, monkeypatch
):
    backend = trained_lora
    before = all_weights(backend)
    params = SamplingParams(max_new_tokens=12, seed=(5, 6, 7))
    merged = backend.sample(encode(backend), n=3, params=params)
    after = all_weights(backend)
    assert after.keys() == before.keys()
    for name, w in after.items():
        np.testing.assert_array_equal(w, before[name], err_msg=name)
    assert_adapters_train(backend)  # the adapters are switched back on
    monkeypatch.setattr(backend, "merge_lora_for_sampling", False)
    plain = backend.sample(encode(backend), n=3, params=params)
    assert [c.completion_ids for c in merged] == [c.completion_ids for c in plain]
    np.testing.assert_allclose([c.logprobs for c in merged], [c.logprobs for c in plain], atol=1e-5)
    # the adapters matter here (the base model, B = 0, samples otherwise), so the equality says the merge applied them
    base = make("torch", tiny_model_path).sample(encode(backend), n=3, params=params)
    assert [c.completion_ids for c in base] != [c.completion_ids for c in plain]


def test_sampling_decodes_with_the_adapters_merged(trained_lora, monkeypatch):
    entered = []
    merge = ops.lora_merged
    monkeypatch.setattr(ops, "lora_merged", lambda model: entered.append(1) or merge(model))
    trained_lora.sample(encode(trained_lora, ["x"]), n=1, params=SamplingParams(max_new_tokens=2, seed=0))
    assert entered == [1]
    monkeypatch.setattr(trained_lora, "merge_lora_for_sampling", False)
    trained_lora.sample(encode(trained_lora, ["x"]), n=1, params=SamplingParams(max_new_tokens=2, seed=0))
    assert entered == [1]


def test_merged_weights_are_used_while_decoding(tiny_model_path):
    model = policy_model(tiny_model_path).eval()
    layer = next(iter(ops.lora_layers(model).values()))
    base = layer.get_base_layer()
    original = base.weight.detach().clone()
    seen = []
    hook = base.register_forward_hook(lambda m, args, out: seen.append(m.weight.detach().clone()))
    try:
        with torch.inference_mode(), ops.lora_merged(model):
            model(input_ids=torch.tensor([[5, 6, 7]], device=TORCH_DEVICE))
    finally:
        hook.remove()
    expected = base.weight.detach() + layer.get_delta_weight(ops.ADAPTER).detach()
    assert seen and all(torch.equal(w, expected) for w in seen)
    assert not torch.equal(base.weight, expected) and torch.equal(base.weight, original)


def test_an_error_while_decoding_still_restores_the_weights(trained_lora, monkeypatch):
    backend = trained_lora
    before = all_weights(backend)
    params = SamplingParams(max_new_tokens=6, seed=(1, 2, 3))
    expected = backend.sample(encode(backend), n=2, params=params)
    calls = []
    step = torch_decode.forward_step

    def fail_on_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return step(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch_decode, "forward_step", fail_on_third_call)
        with pytest.raises(RuntimeError, match="boom"):
            backend.sample(encode(backend), n=2, params=params)
    for name, w in all_weights(backend).items():
        np.testing.assert_array_equal(w, before[name], err_msg=name)
    assert_adapters_train(backend)  # adapters switched back on
    again = backend.sample(encode(backend), n=2, params=params)
    assert [c.completion_ids for c in again] == [c.completion_ids for c in expected]
    assert [c.logprobs for c in again] == [c.logprobs for c in expected]


# ------------------------------------------------------------------ fused AdamW


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_fused_adamw_takes_the_plain_adamw_step(tiny_model_path, tmp_path, monkeypatch, use_lora):
    adamw, built = torch.optim.AdamW, []

    def recorded(params, **settings):
        built.append(settings.get("fused"))
        return adamw(params, **settings)

    def without_fused_kernel(params, *, fused=None, **settings):  # as where torch has no fused kernel
        if fused:
            raise RuntimeError("no fused AdamW for this device and dtype")
        return adamw(params, **settings)

    with monkeypatch.context() as m:
        m.setattr(torch.optim, "AdamW", recorded)
        fused = make("torch", tiny_model_path, model={"use_lora": use_lora}, weight_decay=1.0)
        assert built == [True]  # CPU float32 has the fused kernel
        m.setattr(torch.optim, "AdamW", without_fused_kernel)
        plain = make("torch", tiny_model_path, model={"use_lora": use_lora}, weight_decay=1.0)  # the single-tensor loop
    batch = train_batch(fused)
    start = fused.parameters()
    for _ in range(3):
        a, b = fused.train_step(batch, loss=LOSS), plain.train_step(batch, loss=LOSS)
        assert a.loss == pytest.approx(b.loss, abs=1e-6)
    p, q = fused.parameters(), plain.parameters()
    for name in p:
        assert not np.array_equal(p[name], start[name]), name
        np.testing.assert_allclose(p[name], q[name], atol=1e-5, rtol=0)  # float rounding (6e-6 on CUDA); steps ~3e-3
    fused.save(tmp_path / "fused")
    plain.save(tmp_path / "plain")
    moments, plain_moments = (load_file(str(tmp_path / k / "optimizer.safetensors")) for k in ("fused", "plain"))
    assert moments.keys() == plain_moments.keys() == {f"{n}.{m}" for n in p for m in ("exp_avg", "exp_avg_sq")}
    for key, value in moments.items():
        np.testing.assert_allclose(value, plain_moments[key], atol=1e-7, rtol=1e-4, err_msg=key)
    assert json.loads((tmp_path / "fused" / "backend_state.json").read_text())["optimizer_step"] == 3


# ------------------------------------- shared-prompt, completion-only log-probs


def grouped_batch(pad_id: int = 0) -> SequenceBatch:
    """3 prompts of different lengths x 3 completions of unequal lengths (one of a single token)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 1000, size=length).tolist() for length in (7, 3, 11)]
    completions = []
    for p, prompt in enumerate(prompts):
        for s, length in enumerate((1 + 4 * p, 8, 3)):
            ids = tuple(rng.integers(5, 1000, size=length).tolist())
            completions.append(Completion(f"{p}-{s}", p, s, tuple(prompt), ids, (), "", "length"))
    return SequenceBatch.from_completions(completions, pad_id=pad_id)


def forwards(model, fn) -> list[tuple]:
    """The ``(rows, tokens)`` of every model forward that ``fn()`` runs."""
    calls = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        fn()
    finally:
        hook.remove()
    return calls


def tensors(rows: SequenceBatch, device: str = TORCH_DEVICE):
    return torch.as_tensor(rows.input_ids, device=device), torch.as_tensor(rows.attention_mask, device=device)


def loss_grads(model, fn, weights) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (fn() * weights).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# micro-batches: whole groups, a split group + a whole one, two groups' edges, one row, rows of one prompt
SLICES = [slice(0, 9), slice(1, 5), slice(5, 7), slice(4, 5), slice(6, 9)]


@pytest.fixture
def exact_attention():
    """On CUDA, attention through PyTorch's math kernel for the test.

    The fused CUDA kernels round the cached (shared-prompt) shapes differently from whole rows:
    on an H200 one LoRA gradient element was 2.7e-5 to 4.5e-5 apart, every run alike; with the
    math kernel all are within the CPU tolerances, so those still test the arithmetic.
    """
    if not TORCH_DEVICE.startswith("cuda"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-head-call", "head-in-chunks"])
def test_shared_prompt_forward_equals_the_whole_row_forward(
    tiny_model_path, monkeypatch, exact_attention, use_lora, chunked
):
    model, seqs = policy_model(tiny_model_path, use_lora=use_lora), grouped_batch()
    if chunked:  # 5 positions per LM-head chunk: several chunks, recomputed in the backward pass
        monkeypatch.setattr(fwd, "HEAD_CHUNK_ELEMENTS", 5 * model.config.vocab_size)
    rng = np.random.default_rng(1)
    for index in SLICES:
        rows = seqs.rows(index)
        ids, attn = tensors(rows)
        completion = torch.as_tensor(rows.loss_mask, device=TORCH_DEVICE)
        model.eval()
        with torch.inference_mode():
            whole = ops.token_logp(model, ids, attn)
            shared = fwd.sequence_logp(model, ids, attn, rows.loss_mask)
            completion_only = fwd.sequence_logp(model, ids, attn, rows.loss_mask, prompt_targets=False)
        torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(completion_only, whole * completion, atol=1e-5, rtol=0)
        model.train()
        weights = torch.as_tensor(rng.standard_normal(completion.shape).astype(np.float32), device=TORCH_DEVICE)
        weights = weights * completion
        expected = loss_grads(model, lambda: ops.token_logp(model, ids, attn), weights)
        got = loss_grads(
            model, lambda: fwd.sequence_logp(model, ids, attn, rows.loss_mask, prompt_targets=False), weights
        )
        assert got.keys() == expected.keys() and expected
        for name in expected:
            assert expected[name].abs().max() > 0, name
            torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4)
    model.eval()


def test_each_distinct_prompt_is_forwarded_once(tiny_model_path):
    model, seqs = policy_model(tiny_model_path), grouped_batch()

    def run(index):
        rows = seqs.rows(index)
        with torch.inference_mode():
            fwd.sequence_logp(model, *tensors(rows), rows.loss_mask)

    # 9 rows, 3 prompts (longest 11 tokens): the prompts once, then the completions but their last token
    assert forwards(model, lambda: run(slice(0, 9))) == [(3, 11), (9, 8)]
    assert forwards(model, lambda: run(slice(1, 5))) == [(2, 7), (4, 7)]  # a micro-batch that splits a group
    # no prompt shared (one sample per prompt): one whole-row forward
    whole = seqs.rows(np.array([0, 3, 6]))
    assert forwards(model, lambda: run(np.array([0, 3, 6]))) == [(3, whole.input_ids.shape[1])]


def test_the_backend_scores_and_trains_as_the_whole_row_forward(trained_lora, monkeypatch):
    """``logprobs`` and a step's gradients, with micro-batches (of 4) that split groups, against the plain forward."""
    backend = trained_lora
    batch = train_batch(backend, n=3, max_new_tokens=6)
    policy, reference = backend.logprobs(batch.sequences), backend.logprobs(batch.sequences, reference=True)
    fast, _ = backend.gradients(batch, loss=LOSS)

    monkeypatch.setattr(
        fwd,
        "sequence_logp",
        lambda model, ids, attn, mask, temperature=1.0, **kw: ops.token_logp(model, ids, attn, temperature),
    )
    np.testing.assert_allclose(policy, backend.logprobs(batch.sequences), atol=1e-5)
    np.testing.assert_allclose(reference, backend.logprobs(batch.sequences, reference=True), atol=1e-5)
    assert np.abs(policy - reference).max() > 1e-2  # the adapters are on for the policy
    plain, _ = backend.gradients(batch, loss=LOSS)
    assert fast.keys() == plain.keys() and plain
    for name in plain:
        np.testing.assert_allclose(fast[name], plain[name], atol=2e-5, rtol=1e-4, err_msg=name)


def test_one_token_prompts_and_rows_without_completion(tiny_model_path):
    """Every target scored (the mask ``test_cli`` uses): 1-token prompts, shared; and all-prompt rows, shared."""
    rows = [[7, 20, 21, 22], [7, 30, 31], [8, 40], [9, 50, 51, 52], [9, 50, 51, 52]]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    attention = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    loss_mask = attention[:, 1:].astype(np.float32)
    loss_mask[3:] = 0  # the last two rows are all prompt, and the same prompt
    model = policy_model(tiny_model_path).eval()
    for n in (3, 5):  # only 1-token prompts (a 1-wide prompt frame), then with the all-prompt rows too
        ids_n, attention_n, mask_n = (torch.as_tensor(a[:n], device=TORCH_DEVICE) for a in (ids, attention, loss_mask))
        with torch.inference_mode():
            whole = ops.token_logp(model, ids_n, attention_n)
            for prompt_targets in (True, False):
                got = fwd.sequence_logp(model, ids_n, attention_n, loss_mask[:n], prompt_targets=prompt_targets)
                torch.testing.assert_close(got, whole if prompt_targets else whole * mask_n, atol=1e-5, rtol=0)
