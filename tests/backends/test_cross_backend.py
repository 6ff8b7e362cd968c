"""MLX and PyTorch on the same weights: the same numbers, and checkpoints that move between them.

Real backends on the real tiny model (CPU, float32), no mocks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402

from rlaif_mlx.backends import mlx as mlx_backend  # noqa: E402
from rlaif_mlx.backends import torch as torch_backend  # noqa: E402
from rlaif_mlx.backends import torch_ops  # noqa: E402
from rlaif_mlx.backends.base import LossSettings, SamplingParams, SequenceBatch, TrainBatch  # noqa: E402
from rlaif_mlx.backends.portable import IncompatibleCheckpoint  # noqa: E402
from rlaif_mlx.config import ModelConfig, TrainingConfig  # noqa: E402
from rlaif_mlx.rl.objective import aggregation_weights  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\nprint(", "x"]  # different lengths on purpose
LOSS = LossSettings(kl_coef=0.1)

# float32 on both sides; the two frameworks differ only in accumulation order
# (matmul blocking, softmax/logsumexp reductions), ~1e-7 relative per op.
# Measured on the tiny model (CPU): log-probs <= 2e-6 apart (teacher-forced and
# the greedy samples' own), loss 4e-8, gradients ~1e-6 relative, grad norm 5e-6
# relative; the tolerances below leave ~5-25x headroom.
PARITY_LOGP_ATOL = 1e-5
PARITY_LOSS_ATOL = 1e-6
# After one AdamW step (lr 1e-3): where a gradient entry is near Adam's eps,
# m / (sqrt(v) + eps) amplifies the float noise, so the updated weights, and
# the log-probs after the step, agree less tightly (measured 1.3e-5).
PARITY_POST_STEP_ATOL = 1e-4


def make(kind: str, path, *, seed: int = 0, model: dict | None = None, **training):
    """A backend of either kind with the same config sections."""
    training = {
        "learning_rate": 1e-3,
        "micro_batch_size": 4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
    } | training
    model = {"lora_r": 4} | ({"torch": {"device": "cpu"}} if kind == "torch" else {}) | (model or {})
    config = ModelConfig(base_model=str(path), **model)
    module = mlx_backend if kind == "mlx" else torch_backend
    return module.create(config, TrainingConfig(**training), seed=seed, total_steps=8)


def encode(backend, texts=PROMPTS) -> list[list[int]]:
    return [backend.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def train_batch(backend, *, seed: int = 0) -> TrainBatch:
    """A fixed batch from real samples, with deterministic advantages and reference log-probs."""
    completions = backend.sample(encode(backend), n=3, params=SamplingParams(max_new_tokens=6, seed=seed))
    seqs = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
    return TrainBatch(
        sequences=seqs,
        advantages=np.random.default_rng(seed).standard_normal(len(seqs)).astype(np.float32),
        token_weights=aggregation_weights(seqs.loss_mask).astype(np.float32),
        ref_logp=backend.logprobs(seqs, reference=True),
    )


def saved_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint's safetensors files, read with numpy (name -> array)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return out


# ------------------------------------------------------------------ parity


def test_parity_on_the_same_weights(tiny_model_path):
    full = {"use_lora": False}
    ours, theirs = make("mlx", tiny_model_path, model=full), make("torch", tiny_model_path, model=full)
    assert (ours.eos_ids, ours.pad_id) == (theirs.eos_ids, theirs.pad_id)
    assert encode(ours) == encode(theirs)

    # greedy decoding: the same tokens, prompt by prompt, for 32 new tokens (or up to the same EOS)
    greedy = SamplingParams(max_new_tokens=32, top_k=1)
    a, b = ours.sample(encode(ours), n=1, params=greedy), theirs.sample(encode(theirs), n=1, params=greedy)
    for x, y in zip(a, b, strict=True):
        assert x.completion_ids == y.completion_ids
        assert x.finish_reason == y.finish_reason and x.text == y.text
        assert len(x.completion_ids) == 32 or x.finish_reason == "eos"
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=PARITY_LOGP_ATOL)

    # teacher-forced log-probs of sampled sequences of different lengths
    batch = train_batch(ours)
    lp_ours, lp_theirs = ours.logprobs(batch.sequences), theirs.logprobs(batch.sequences)
    np.testing.assert_allclose(lp_ours, lp_theirs, atol=PARITY_LOGP_ATOL)
    np.testing.assert_allclose(batch.ref_logp, theirs.logprobs(batch.sequences, reference=True), atol=PARITY_LOGP_ATOL)

    # one full fine-tune step from the same weights on the same batch
    batch.old_logp = lp_ours + 0.05 * np.random.default_rng(1).standard_normal(lp_ours.shape).astype(np.float32)
    s_ours, s_theirs = ours.train_step(batch, loss=LOSS), theirs.train_step(batch, loss=LOSS)
    assert s_ours.loss == pytest.approx(s_theirs.loss, abs=PARITY_LOSS_ATOL)
    for key in ("pg_loss", "kl", "ratio_mean"):
        assert getattr(s_ours, key) == pytest.approx(getattr(s_theirs, key), abs=PARITY_LOSS_ATOL)
    assert s_ours.clip_fraction == pytest.approx(s_theirs.clip_fraction, abs=1e-6)
    assert s_ours.grad_norm == pytest.approx(s_theirs.grad_norm, rel=1e-4)
    assert s_ours.lr == s_theirs.lr
    after_ours, after_theirs = ours.logprobs(batch.sequences), theirs.logprobs(batch.sequences)
    assert np.abs(after_ours - lp_ours).max() > 1e-3  # the step moved the model ...
    np.testing.assert_allclose(after_ours, after_theirs, atol=PARITY_POST_STEP_ATOL)  # ... the same way


def test_parity_at_a_sampling_temperature(tiny_model_path):
    """At T = 0.7 with top-p 0.9: each backend's recorded log-probs are the other's teacher-forced ones at T,
    and a training step at T (reference and ratio at T) is the same step on both."""
    t = 0.7
    full = {"use_lora": False}
    ours, theirs = make("mlx", tiny_model_path, model=full), make("torch", tiny_model_path, model=full)
    params = SamplingParams(max_new_tokens=12, seed=(1, 2, 3), temperature=t, top_p=0.9)
    for sampler, scorer in ((ours, theirs), (theirs, ours)):
        completions = sampler.sample(encode(sampler), n=3, params=params)
        seqs = SequenceBatch.from_completions(completions, pad_id=sampler.pad_id)
        for i, c in enumerate(completions):
            start = len(c.prompt_ids) - 1
            scored = scorer.logprobs(seqs, temperature=t)[i, start : start + len(c.logprobs)]
            np.testing.assert_allclose(c.logprobs, scored, atol=PARITY_LOGP_ATOL, err_msg=sampler.name)

    batch = train_batch(ours)
    lp_ours, lp_theirs = ours.logprobs(batch.sequences, temperature=t), theirs.logprobs(batch.sequences, temperature=t)
    np.testing.assert_allclose(lp_ours, lp_theirs, atol=PARITY_LOGP_ATOL)
    assert np.abs(lp_ours - ours.logprobs(batch.sequences)).max() > 0.05  # T = 0.7 is not T = 1
    batch.ref_logp = ours.logprobs(batch.sequences, reference=True, temperature=t)
    np.testing.assert_allclose(
        batch.ref_logp, theirs.logprobs(batch.sequences, reference=True, temperature=t), atol=PARITY_LOGP_ATOL
    )
    batch.old_logp = lp_ours + 0.05 * np.random.default_rng(1).standard_normal(lp_ours.shape).astype(np.float32)
    loss = LossSettings(kl_coef=0.1, temperature=t)
    s_ours, s_theirs = ours.train_step(batch, loss=loss), theirs.train_step(batch, loss=loss)
    for key in ("loss", "pg_loss", "kl", "ratio_mean"):
        assert getattr(s_ours, key) == pytest.approx(getattr(s_theirs, key), abs=PARITY_LOSS_ATOL), key
    assert s_ours.grad_norm == pytest.approx(s_theirs.grad_norm, rel=1e-4)
    after_ours, after_theirs = (b.logprobs(batch.sequences, temperature=t) for b in (ours, theirs))
    assert np.abs(after_ours - lp_ours).max() > 1e-3
    np.testing.assert_allclose(after_ours, after_theirs, atol=PARITY_POST_STEP_ATOL)


# -------------------------------------------------------------- portability


@pytest.mark.parametrize(("source", "target"), [("mlx", "torch"), ("torch", "mlx")])
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_a_checkpoint_continues_on_the_other_backend(tiny_model_path, tmp_path, source, target, use_lora):
    """Train on one backend (warm-up rebase included), save, load into the other, train on both: same numbers."""
    model = {"use_lora": use_lora}
    first = make(source, tiny_model_path, model=model, learning_rate=1e-2)
    batch = train_batch(first)
    first.train_step(batch, loss=LOSS, learning_rate=1e-2)  # a warm-up step, then the reference moves
    first.rebase_reference()
    for _ in range(2):
        first.train_step(batch, loss=LOSS)
    first.save(tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "backend_state.json").read_text())
    assert state["backend"] == source and state["step"] == 2 and state["optimizer_step"] == 2

    second = make(target, tiny_model_path, seed=7, model=model, learning_rate=1e-2)
    assert np.abs(second.logprobs(batch.sequences) - first.logprobs(batch.sequences)).max() > 1e-3
    second.load(tmp_path / "ckpt")
    for which in ("trainable", "frozen", "reference"):  # the same names, and the same weights
        mine, theirs = second.parameters(which=which), first.parameters(which=which)
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            np.testing.assert_array_equal(value, theirs[key], err_msg=f"{which}: {key}")
    for reference in (False, True):
        np.testing.assert_allclose(
            second.logprobs(batch.sequences, reference=reference),
            first.logprobs(batch.sequences, reference=reference),
            atol=PARITY_LOGP_ATOL,
        )

    # The optimizer's moments and step count and the LR schedule position came along:
    # the next step is the same step on both backends.
    a, b = first.train_step(batch, loss=LOSS), second.train_step(batch, loss=LOSS)
    assert a.lr == b.lr
    assert a.loss == pytest.approx(b.loss, abs=PARITY_LOSS_ATOL)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    np.testing.assert_allclose(
        second.logprobs(batch.sequences), first.logprobs(batch.sequences), atol=PARITY_POST_STEP_ATOL
    )
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    ta, tb = saved_tensors(tmp_path / "a"), saved_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys()
    for key in ta:
        np.testing.assert_allclose(ta[key], tb[key], atol=PARITY_POST_STEP_ATOL, err_msg=key)


def test_peft_loads_an_mlx_adapter(tiny_model_path, tmp_path):
    """The MLX backend's LoRA checkpoint is a PEFT adapter folder: PeftModel reads it as is."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend = make("mlx", tiny_model_path, learning_rate=1e-2)
    batch = train_batch(backend)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS)
    backend.save(tmp_path / "ckpt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ckpt").eval()
    with torch.inference_mode():
        got = torch_ops.token_logp(
            peft_model, torch.as_tensor(batch.sequences.input_ids), torch.as_tensor(batch.sequences.attention_mask)
        ).numpy()
    np.testing.assert_allclose(got, backend.logprobs(batch.sequences), atol=PARITY_LOGP_ATOL)


def test_mismatched_checkpoints_are_refused_with_the_reason(tiny_model_path, tmp_path):
    make("mlx", tiny_model_path).save(tmp_path / "ckpt")
    with pytest.raises(IncompatibleCheckpoint, match=r"model\.lora_r is 8 here but 4"):
        make("torch", tiny_model_path, model={"lora_r": 8}).load(tmp_path / "ckpt")
    with pytest.raises(IncompatibleCheckpoint, match="use_lora: true"):
        make("torch", tiny_model_path, model={"use_lora": False}).load(tmp_path / "ckpt")
    with pytest.raises(IncompatibleCheckpoint, match="not a checkpoint folder"):
        make("torch", tiny_model_path).load(tmp_path)


# ---------------------------------------------------------- quantised bases


@pytest.fixture(scope="module")
def quantized_path(tiny_model_path, tmp_path_factory):
    """The tiny model quantised to 8 bits by mlx-lm's own converter (as mlx-community models are)."""
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("quantized") / "tiny-8bit"
    convert(str(tiny_model_path), mlx_path=str(path), quantize=True, q_group_size=64, q_bits=8)
    return path


def test_lora_on_a_quantized_base_trains_exports_and_moves_to_torch(tiny_model_path, quantized_path, tmp_path):
    backend = make("mlx", quantized_path, learning_rate=1e-2)
    frozen = backend.parameters(which="frozen")  # the adapted layers' bases stay quantised: packed weights, scales
    assert frozen["model.layers.0.self_attn.q_proj.weight"].dtype == np.uint32
    assert "model.layers.0.self_attn.q_proj.scales" in frozen
    batch = train_batch(backend)
    before = backend.logprobs(batch.sequences)
    for _ in range(2):
        backend.train_step(batch, loss=LOSS)
    policy = backend.logprobs(batch.sequences)
    assert np.abs(policy - before).max() > 1e-3  # the adapters learn on the frozen quantised base

    # export: dequantised, merged, plain float weights that transformers loads
    backend.export(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    exported = torch_backend.create(
        ModelConfig(base_model=str(tmp_path / "export"), use_lora=False), TrainingConfig(), seed=0, total_steps=1
    )
    np.testing.assert_allclose(exported.logprobs(batch.sequences), policy, atol=PARITY_LOGP_ATOL)

    # the adapter trained on the 8-bit base continues on the float base in PyTorch (laptop -> server)
    backend.save(tmp_path / "ckpt")
    server = make("torch", tiny_model_path)
    server.load(tmp_path / "ckpt")
    float_policy = server.logprobs(batch.sequences)
    assert np.abs(float_policy - policy).max() < 0.05  # only the 8-bit rounding of the base differs

    with pytest.raises(ValueError, match="quantised"):
        make("mlx", quantized_path, model={"use_lora": False})
    with pytest.raises(ValueError, match="quantised for MLX"):
        make("torch", quantized_path)


def test_the_cli_refuses_a_quantized_base_on_torch_in_one_line(quantized_path, tmp_path, capsys):
    from rlaif_mlx.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{base_model: {quantized_path}}}\ndata: {{train_file: builtin:quickstart_train.jsonl}}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    assert main(["train", "--config", str(config), "--backend", "torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: model.base_model") and "quantised for MLX" in err and "\n" not in err


# ------------------------------------------------- the laptop -> server story


def test_an_mlx_run_exports_to_transformers_and_resumes_on_torch(tiny_model_path, tmp_path, capsys):
    """Through the CLI: train with MLX, export (transformers matches MLX), then continue the run on PyTorch."""
    import yaml
    from transformers import AutoModelForCausalLM

    from rlaif_mlx.cli import main
    from rlaif_mlx.monitor.metrics import read_metrics

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps(t) + "\n"
            for t in [
                {
                    "id": "add",
                    "prompt": "Write add(a, b).",
                    "reference": "def add(a, b):\n    return a + b\n",
                    "tests": "assert add(1, 2) == 3",
                },
                {
                    "id": "neg",
                    "prompt": "Write neg(x).",
                    "reference": "def neg(x):\n    return -x\n",
                    "tests": "assert neg(1) == -1",
                },
            ]
        )
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed": 3,
                "backend": "mlx",
                "output_dir": str(tmp_path / "run"),
                "model": {"base_model": str(tiny_model_path), "lora_r": 4},
                "data": {"train_file": str(tasks)},
                "training": {
                    "max_steps": 2,
                    "batch_size": 2,
                    "micro_batch_size": 4,
                    "learning_rate": 1e-2,
                    "save_steps": 2,
                    "sft_warmup_steps": 2,
                    "sft_batch_size": 2,
                },
                "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 12},
                "rewards": {"test_timeout_s": 5},
            }
        )
    )
    assert main(["train", "--config", str(config)]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert json.loads((checkpoint / "backend_state.json").read_text())["backend"] == "mlx"

    # export: a plain HF model whose log-probs are MLX's (to the parity tolerance)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert "(backend mlx)" in capsys.readouterr().out
    mlx_side = make("mlx", tiny_model_path)
    mlx_side.load(checkpoint)
    batch = train_batch(mlx_side)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.inference_mode():
        hf = torch_ops.token_logp(
            exported, torch.as_tensor(batch.sequences.input_ids), torch.as_tensor(batch.sequences.attention_mask)
        ).numpy()
    np.testing.assert_allclose(hf, mlx_side.logprobs(batch.sequences), atol=PARITY_LOGP_ATOL)

    # the same config, on the server: PyTorch continues the MLX run from its checkpoint
    assert main(["train", "--config", str(config), "--backend", "torch", "--max-steps", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "backend torch" in out and "resuming from" in out and "warm-up" not in out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000003" / "backend_state.json").read_text())
    # AdamW counted MLX's two steps and PyTorch's one: the optimizer state came along
    assert state["backend"] == "torch" and state["optimizer_step"] == 3 and state["rebased"] is True


def test_a_torch_export_loads_in_mlx_lm_with_the_same_log_probs(tiny_model_path, tmp_path):
    """transformers 5 writes rope_theta only under rope_parameters; the export repeats it where mlx-lm reads it."""
    from mlx_lm.utils import load as mlx_lm_load

    from rlaif_mlx.backends import mlx_ops

    backend = make("torch", tiny_model_path, learning_rate=1e-2)
    batch = train_batch(backend)
    backend.train_step(batch, loss=LOSS)
    backend.export(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_theta"] == 10000.0
    model, _ = mlx_lm_load(str(tmp_path / "hf"))
    got = mlx_ops.token_logp(
        model, mx.array(batch.sequences.input_ids.astype(np.int32)), mx.array(batch.sequences.attention_mask)
    )
    np.testing.assert_allclose(np.array(got), backend.logprobs(batch.sequences), atol=PARITY_LOGP_ATOL)
