"""The one model-path check of ``train`` and ``doctor``: local-looking paths never reach the hub, a folder
that is not a model names the file it lacks, and the hub is never retried for a minute."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.training.preflight import check_model_path, check_writable, looks_local


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: a hub there cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return home


def test_what_looks_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./x", "../x", "/x/y", "~/x", ".", "models/tiny"):  # models/ exists here
        assert looks_local(name), name
    for name in ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "gpt2", "nowhere/tiny"):
        assert not looks_local(name), name


def test_a_model_folder_and_what_is_not_one(tmp_path, tiny_model_path):
    assert check_model_path(str(tiny_model_path)) == check_model_path(str(tiny_model_path), probe_hub=True)
    assert check_model_path(str(tiny_model_path)).ok
    missing = check_model_path("./models/nothing")
    assert not missing.ok and missing.detail == "./models/nothing does not exist"
    assert missing.line("model.base_model").startswith("model.base_model: ./models/nothing does not exist; point")
    (tmp_path / "file").write_text("")
    assert check_model_path(str(tmp_path / "file")).detail == f"{tmp_path / 'file'} is a file, not a model folder"
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in check_model_path(str(tmp_path / "empty")).detail
    assert check_model_path(str(tmp_path / "empty"), build_tiny=True).ok  # an empty folder to build the model in
    shutil.copytree(tiny_model_path, tmp_path / "weightless", ignore=shutil.ignore_patterns("*.safetensors"))
    assert "holds no weights" in check_model_path(str(tmp_path / "weightless")).detail
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in check_model_path(str(tmp_path / "bad")).detail


def test_hf_hub_offline_is_honoured_and_an_unreachable_hub_is_not_retried(empty_hub_cache, closed_port, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = check_model_path("someone/some-model", probe_hub=True)
    assert not found.ok and found.detail.endswith("not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    found = check_model_path("someone/some-model", probe_hub=True)
    assert not found.ok and "127.0.0.1 cannot be reached" in found.detail
    doctor = check_model_path("someone/some-model")  # doctor never goes over the network
    assert doctor.ok and doctor.warn and "hf download someone/some-model" in doctor.fix


def fake_hub_cache(hub: Path, repo: str, model: Path) -> None:
    """``model`` as huggingface_hub lays out a downloaded snapshot of ``repo``."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, folder / "snapshots" / "abc123")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")


def test_train_with_a_hub_id_and_no_hub_is_one_line_or_uses_the_cache(
    empty_hub_cache, closed_port, tmp_path, tiny_model_path
):
    """Real processes, as a user runs them: the hub switch is process-wide, so it must not leak into this one."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "a", "prompt": "Write a(x).", "tests": "assert a(1) == 1"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backend": "torch",
                "output_dir": str(tmp_path / "run"),
                "model": {"base_model": "someone/tiny", "lora_r": 2},
                "data": {"train_file": str(tasks)},
                "training": {"max_steps": 1, "batch_size": 1, "micro_batch_size": 2},
                "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 4},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {
        "HF_HUB_CACHE": str(empty_hub_cache / "hub"),
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}",
    }
    argv = [sys.executable, "-m", "rlaif_mlx.cli", "train", "--config", str(config), "--no-dashboard"]
    missing = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: model.base_model: someone/tiny: no such local folder; as a hub id, ")
    assert len(missing.stderr.splitlines()) == 1 and not (tmp_path / "run").exists()

    fake_hub_cache(empty_hub_cache / "hub", "someone/tiny", tiny_model_path)
    cached = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    assert cached.returncode == 0, cached.stderr
    assert "using the copy in the local Hugging Face cache (as with HF_HUB_OFFLINE=1)" in cached.stdout
    assert "Retrying" not in cached.stderr and "thrown while requesting" not in cached.stderr


def test_output_folder_checks(tmp_path):
    assert check_writable(tmp_path / "new" / "run", "output_dir").ok
    (tmp_path / "file").write_text("")
    assert check_writable(tmp_path / "file", "output_dir").line("output_dir") == (
        f"output_dir: {tmp_path / 'file'} is a file; point output_dir elsewhere"
    )
    assert not check_writable(tmp_path / "file" / "run", "output_dir").ok
