"""The command line's resume and export: what they print, refuse and write."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlaif_mlx.backends.base import SequenceBatch
from rlaif_mlx.cli import main
from rlaif_mlx.config import load_config
from rlaif_mlx.monitor.metrics import read_metrics

TASKS = [
    {
        "id": "add",
        "prompt": "Write add(a, b).",
        "entry_point": "add",
        "reference": "def add(a, b):\n    return a + b\n",
        "tests": "assert add(1, 2) == 3",
    },
    {
        "id": "neg",
        "prompt": "Write neg(x).",
        "entry_point": "neg",
        "reference": "def neg(x):\n    return -x\n",
        "tests": "assert neg(1) == -1",
    },
]


def write_config(folder: Path, model_path: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tasks = folder / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    config = {
        "seed": 1,
        "backend": "torch",
        "output_dir": str(folder / "run"),
        "model": {"base_model": str(model_path), "use_lora": True, "lora_r": 4},
        "data": {"train_file": str(tasks)},
        "training": {
            "max_steps": 2,
            "batch_size": 2,
            "micro_batch_size": 4,
            "learning_rate": 1e-2,
            "save_steps": 1,
            "save_total_limit": 2,
            "sft_warmup_steps": 2,
            "sft_batch_size": 2,
        },
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 16},
        "rewards": {"max_workers": 2, "test_timeout_s": 5},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path) -> tuple[Path, Path]:
    """(config, run folder) of a 2-step LoRA run with warm-up; checkpoints at steps 1 and 2."""
    config = write_config(tmp_path_factory.mktemp("trained"), tiny_model_path)
    assert main(["train", "--config", str(config)]) == 0
    return config, Path(load_config(config).output_dir)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_resume_without_a_checkpoint_is_one_line_error(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path)
    assert main(["train", "--config", str(config), "--resume"]) == 2
    err = one_line_error(capsys)
    assert f"{tmp_path / 'run'}: no checkpoint found" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert main(["train", "--config", str(config), "--resume", str(tmp_path / "elsewhere")]) == 2
    assert f"{tmp_path / 'elsewhere'}: no checkpoint found" in one_line_error(capsys)


def test_resume_refuses_a_config_that_changes_the_run(trained, tmp_path, capsys):
    config, run = trained
    changed = yaml.safe_load(config.read_text())
    changed["model"]["lora_r"] = 8
    changed["output_dir"] = str(tmp_path / "run")
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    argv = ["train", "--config", str(config), "--max-steps", "5", "--resume", str(run)]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "different model.lora_r (see" in err
    assert "max_steps" not in err and "output_dir" not in err  # a longer budget and another folder are fine
    assert not (tmp_path / "run").exists()


def test_resume_continues_a_run_in_another_folder(trained, tmp_path, capsys):
    config, run = trained
    capsys.readouterr()
    out_dir = tmp_path / "more"
    argv = ["train", "--config", str(config), "--output-dir", str(out_dir), "--max-steps", "3", "--resume", str(run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints' / 'step-000002'} at step 2\n" in out
    assert "warm-up" not in out and "step    3/3" in out
    assert [r["step"] for r in read_metrics(out_dir / "metrics.jsonl")] == [3]
    assert load_config(out_dir / "checkpoints" / "step-000003" / "config.yaml").training.max_steps == 3


def test_export_writes_a_model_that_scores_like_the_checkpoint(trained, tmp_path, tiny_model_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from rlaif_mlx.backends.torch import create

    _, run = trained
    checkpoint = run / "checkpoints" / "step-000002"
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"exported {checkpoint} to {out} (backend torch)\n"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    umask = os.umask(0)
    os.umask(umask)
    for folder in (out, checkpoint):  # readable like any file the user makes (safetensors writes 0600)
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
            p.name: 0o666 & ~umask for p in folder.iterdir()
        }

    cfg = load_config(checkpoint / "config.yaml")
    backend = create(cfg.model, cfg.training, seed=cfg.seed, total_steps=2)
    backend.load(checkpoint)
    texts = ["def add(a, b):\n    return a + b\n", "Write neg(x).", "x = [1, 2, 3]\nprint(sum(x))"]
    rows = [backend.tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = np.array([r + [backend.pad_id] * (width - len(r)) for r in rows], dtype=np.int64)
    attention = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    mask = attention[:, 1:].astype(np.float32)
    expected = backend.logprobs(SequenceBatch(ids, attention, mask))

    def exported_logprobs(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return logp.gather(-1, torch.from_numpy(ids[:, 1:, None])).squeeze(-1).numpy() * mask

    np.testing.assert_allclose(exported_logprobs(out), expected * mask, atol=1e-4)
    # ... and the trained weights made it in: the untouched base scores differently
    assert np.abs(exported_logprobs(tiny_model_path) - expected * mask).max() > 1e-3


def test_export_falls_back_to_the_run_config_and_reports_errors(trained, tmp_path, capsys):
    _, run = trained
    old = tmp_path / "old-run"
    shutil.copytree(run, old)  # as written before checkpoints held their own config.yaml
    (old / "checkpoints" / "step-000002" / "config.yaml").unlink()
    assert main(["export", "--checkpoint", str(old), "--out", str(tmp_path / "a")]) == 0
    assert f"exported {old / 'checkpoints' / 'step-000002'} to" in capsys.readouterr().out
    assert (tmp_path / "a" / "model.safetensors").is_file()

    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "b")]) == 2
    assert f"{tmp_path / 'none'}: no checkpoint found" in one_line_error(capsys)
    missing_step = run / "checkpoints" / "step-000099"  # a checkpoint that is not there: the ones that are
    assert main(["export", "--checkpoint", str(missing_step), "--out", str(tmp_path / "b")]) == 2
    assert one_line_error(capsys) == (
        f"error: {missing_step}: no such checkpoint; {run} holds step-000001, step-000002 "
        f"(or give the run folder {run} for its newest)"
    )
    (old / "config.yaml").unlink()
    assert main(["export", "--checkpoint", str(old), "--out", str(tmp_path / "b")]) == 2
    assert "no config.yaml in the checkpoint or its run folder" in one_line_error(capsys)
    missing = tmp_path / "no-such-model"
    argv = ["export", "--checkpoint", str(run), "--out", str(tmp_path / "b"), "--model", str(missing)]
    assert main(argv) == 2
    assert f"error: model.base_model: {missing} does not exist; point model.base_model at" in one_line_error(capsys)
    assert not (tmp_path / "b").exists() and not missing.exists()
