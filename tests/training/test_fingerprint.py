"""Checkpoints know their base: --resume, eval and export refuse another base of the same shape,
naming both, unless --allow-other-base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.cli import main
from rlaif_mlx.training.fingerprint import base_fingerprint


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """The tiny model's shape with other random weights."""
    from rlaif_mlx.data.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("other") / "tiny-seed-1"
    build_tiny_model(path, seed=1)
    return path


def test_the_fingerprint_follows_the_weights_not_the_folder(tiny_model_path, other_base, tmp_path):
    a = base_fingerprint(str(tiny_model_path))
    assert a is not None and a["name"] == str(tiny_model_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    assert base_fingerprint(str(copy))["fingerprint"] == a["fingerprint"]  # the same base elsewhere
    assert base_fingerprint(str(other_base))["fingerprint"] != a["fingerprint"]  # same shapes, other weights
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    first = min(k for k in header if k != "__metadata__")  # the first tensor by name is always hashed
    data[8 + length + header[first]["data_offsets"][0]] ^= 0xFF  # one byte of it
    weights.write_bytes(bytes(data))
    assert base_fingerprint(str(copy))["fingerprint"] != a["fingerprint"]
    assert base_fingerprint(str(tmp_path / "nowhere")) is None  # nothing to compare: nothing is refused


def test_resume_eval_and_export_refuse_another_base(tiny_model_path, other_base, tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "a", "prompt": "Write a(x).", "tests": "assert a(1) == 1"}) + "\n")
    raw = {
        "backend": "torch",
        "output_dir": str(tmp_path / "run"),
        "model": {"base_model": str(tiny_model_path), "lora_r": 2},
        "data": {"train_file": str(tasks), "eval_file": str(tasks)},
        "training": {"max_steps": 1, "batch_size": 1, "micro_batch_size": 2},
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 4},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["base"] == base_fingerprint(str(tiny_model_path))
    capsys.readouterr()

    other = ["--model", str(other_base)]
    refusals = {
        "resume": ["train", "--config", str(config), "--resume", "--max-steps", "2", *other],
        "export": ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), *other],
    }
    raw["model"]["base_model"] = str(other_base)
    other_config = tmp_path / "other.yaml"
    other_config.write_text(yaml.safe_dump(raw | {"output_dir": str(tmp_path / "run2")}))
    refusals["eval"] = ["eval", "--config", str(other_config), "--checkpoint", str(checkpoint), "--max-tasks", "1"]
    for name, argv in refusals.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (name, err)
        assert f"was trained from base model {tiny_model_path} (weights " in err, (name, err)
        assert f"not {other_base} (weights " in err and "--allow-other-base" in err, (name, err)
    assert not (tmp_path / "out").exists()
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1  # the refused resume wrote nothing

    assert main([*refusals["export"], "--allow-other-base"]) == 0
    assert "loading it anyway (--allow-other-base)" in capsys.readouterr().err
    assert main([*refusals["resume"], "--allow-other-base"]) == 0
    assert "loading it anyway (--allow-other-base)" in capsys.readouterr().out
