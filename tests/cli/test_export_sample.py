"""``rlaif-mlx export --format mlx [--quantize 4|8]`` and ``rlaif-mlx sample`` on a tiny trained checkpoint.

The Hugging Face export itself (loads in transformers, scores like the
checkpoint) is covered in test_cli.py; here the MLX export is checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from rlaif_mlx.backends.base import LossSettings, SequenceBatch, TrainBatch  # noqa: E402
from rlaif_mlx.cli import main  # noqa: E402
from rlaif_mlx.config import RunConfig, save_config  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "Write neg(x).", "x = [1, 2, 3]\nprint(sum(x))"]
# Mean |log p| change per token that quantisation may cause on the tiny model (measured on Linux
# CPU: 0.0024 nats at 8 bits, max 0.006; 0.046 at 4 bits, max 0.12). The bounds leave 3-4x room.
QUANT_TOLERANCE = {8: 0.01, 4: 0.15}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_path) -> Path:
    """A run folder with one LoRA checkpoint after one large train step (so it differs from the base)."""
    from rlaif_mlx.backends.torch import create

    folder = tmp_path_factory.mktemp("export") / "run"
    config = RunConfig.model_validate(
        {
            "seed": 3,
            "backend": "torch",
            "output_dir": str(folder),
            "model": {"base_model": str(tiny_model_path), "lora_r": 4, "torch": {"device": "cpu"}},
            "data": {"train_file": "builtin:quickstart_train.jsonl"},
            "training": {"max_steps": 1, "learning_rate": 5e-2},
            "rlaif": {"max_new_tokens": 12},
        }
    )
    backend = create(config.model, config.training, seed=config.seed, total_steps=1)
    ids, attention, mask = encode(backend.tokenizer, backend.pad_id)
    batch = TrainBatch(
        SequenceBatch(ids, attention, mask),
        advantages=np.ones(len(ids), dtype=np.float32),
        token_weights=mask / mask.sum(),
    )
    backend.train_step(batch, loss=LossSettings())
    checkpoint = folder / "checkpoints" / "step-000001"
    checkpoint.mkdir(parents=True)
    backend.save(checkpoint)  # laid out as checkpoint.save_checkpoint writes it
    save_config(config, checkpoint / "config.yaml")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1}))
    return folder


@pytest.fixture(scope="module")
def hf_export(run, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(folder, log-probs ``[N, T-1]`` under transformers, mask of real targets) of the Hugging Face export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif_mlx.backends.torch_ops import token_logp

    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids, attention, mask = encode(tokenizer, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = token_logp(model, torch.from_numpy(ids), torch.from_numpy(attention)).numpy()
    return out, logp, mask


def encode(tokenizer, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TEXTS as right-padded (ids, attention, mask of real targets)."""
    rows = [tokenizer.encode(t) for t in TEXTS]
    width = max(map(len, rows))
    ids = np.array([r + [pad_id] * (width - len(r)) for r in rows], dtype=np.int64)
    attention = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    return ids, attention, (attention[:, 1:] * attention[:, :-1]).astype(np.float32)


def mlx_logprobs(path: Path) -> np.ndarray:
    import mlx_lm

    from rlaif_mlx.backends.mlx_ops import token_logp

    model, tokenizer = mlx_lm.load(str(path))
    ids, attention, _ = encode(tokenizer, tokenizer.pad_token_id)
    return np.array(token_logp(model, mx.array(ids), mx.array(attention)))


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_mlx_export_loads_in_mlx_lm_and_scores_like_the_hf_export(backend, run, hf_export, tmp_path, capsys):
    _, expected, _ = hf_export
    out = tmp_path / "mlx"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "mlx", "--backend", backend]) == 0
    checkpoint = run / "checkpoints" / "step-000001"
    assert capsys.readouterr().out == f"exported {checkpoint} to {out} (backend {backend}; MLX format, not quantised)\n"
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert not list(out.parent.glob(".mlx-*"))  # the temporary Hugging Face folder is gone
    np.testing.assert_allclose(mlx_logprobs(out), expected, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_mlx_export_is_smaller_and_close(bits, run, hf_export, tmp_path, capsys):
    hf_out, expected, mask = hf_export
    out = tmp_path / f"q{bits}"
    assert (
        main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "mlx", "--quantize", str(bits)]) == 0
    )
    assert capsys.readouterr().out.endswith(f"(backend torch; MLX format, {bits}-bit)\n")
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["bits"] == bits and quantization["group_size"] == 64
    assert weight_bytes(out) < weight_bytes(hf_out) * (0.4 if bits == 8 else 0.25)
    error = np.abs(mlx_logprobs(out) - expected).sum() / mask.sum()
    assert 0 < error < QUANT_TOLERANCE[bits], error


def test_quantize_needs_the_mlx_format(run, tmp_path, capsys):
    argv = ["export", "--checkpoint", str(run), "--out", str(tmp_path / "q"), "--quantize", "8"]
    assert main(argv) == 2
    assert "--quantize 8 needs --format mlx: transformers cannot read" in one_line_error(capsys)
    assert not (tmp_path / "q").exists()


def sample(run, capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(run), "--prompt", "Write add(a, b).", *args]) == 0
    return capsys.readouterr().out


def test_sample_prints_numbered_completions(run, capsys):
    out = sample(run, capsys, "-n", "3", "--max-new-tokens", "6", "--temperature", "1.0")
    headers = [line for line in out.splitlines() if line.startswith("--- sample ")]
    assert [h.split(":")[0] for h in headers] == [f"--- sample {i} of 3" for i in (1, 2, 3)]
    assert all(h.endswith(("finish: eos ---", "finish: stop ---", "finish: length ---")) for h in headers)
    assert all(" tokens, " in h for h in headers)


def test_greedy_sampling_repeats_itself(run, capsys):
    args = ("-n", "2", "--max-new-tokens", "8", "--temperature", "0")
    first = sample(run, capsys, *args)
    assert first == sample(run, capsys, *args)
    one, two = first.split("--- sample 2 of 2")
    assert one.split(":", 1)[1].strip() == two.split(":", 1)[1].strip()  # greedy: both samples alike


def test_sample_of_a_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert f"{tmp_path / 'nothing'}: no checkpoint found" in one_line_error(capsys)
