"""Exact resume of a real ``rlaif-mlx train`` process: killed with SIGKILL, or stopped with SIGINT / SIGTERM.

A run killed at any point and resumed from its last checkpoint produces, on CPU
with a fixed seed, the same per-step metrics and final weights as a run that was
never interrupted; so does one stopped by Ctrl-C during its supervised warm-up.
The tasks make an epoch two steps long, so the runs cross
epoch boundaries (and a checkpoint on one resumes into the next epoch).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from rlaif_mlx.data.tasks import resolve_data_path
from rlaif_mlx.monitor.metrics import read_metrics

STEPS = 6
TIMING_KEYS = ("seconds", "tokens_per_second")


HANG = 1800  # seconds: only a hung run takes this long, even on a 2-core machine under other jobs


def write_config(folder: Path, model: Path) -> Path:
    """All weights of the tiny model, 8 tasks, 4 per step (an epoch is 2 steps), a checkpoint every step.

    Full fine-tuning with a 40-step warm-up: the model then passes some tests and not others, so
    the runs have a reward signal to diverge on (a LoRA warm-up this short leaves every reward equal).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = resolve_data_path("builtin:quickstart_train.jsonl").read_text().splitlines()[:8]
    (folder / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        "seed": 5,
        "backend": "torch",
        "output_dir": str(folder / "run"),
        "model": {"base_model": str(model), "use_lora": False},
        "data": {"train_file": str(folder / "tasks.jsonl")},
        "training": {
            "max_steps": STEPS,
            "batch_size": 4,
            "micro_batch_size": 8,
            "learning_rate": 1e-3,
            "save_steps": 1,
            "save_total_limit": 2,
            "sft_warmup_steps": 40,
            "sft_learning_rate": 3e-3,
            "sft_batch_size": 8,
        },
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 32, "baseline": "none", "scale_by_std": False},
        "rewards": {"weights": {"has_code": 0.3, "parses": 0.3, "tests": 0.4}, "test_timeout_s": 5},
        "logging": {"save_samples": True},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlaif_mlx.cli", "train", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},  # each line as it is printed
    )


def wait_for_steps(process: subprocess.Popen, metrics: Path, steps: int, timeout: float = HANG) -> None:
    """Rendezvous: until the run has logged ``steps`` steps (or died); ``timeout`` only stops a hung run."""
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def comparable(records: list[dict]) -> list[dict]:
    """Every metric but the timings; NaN made comparable."""
    return [
        {
            k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in r.items()
            if not any(t in k for t in TIMING_KEYS)
        }
        for r in records
    ]


def final_tensors(run: Path) -> dict[str, np.ndarray]:
    final = run / "checkpoints" / f"step-{STEPS:06d}"
    return {f"{f.name}:{k}": v for f in sorted(final.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_path) -> Path:
    folder = tmp_path_factory.mktemp("whole")
    process = start(write_config(folder, tiny_model_path))
    out, err = process.communicate(timeout=HANG)
    assert process.returncode == 0, err
    return folder / "run"


def test_sigkill_then_resume_matches_an_uninterrupted_run(uninterrupted, tiny_model_path, tmp_path):
    config = write_config(tmp_path, tiny_model_path)
    process = start(config)
    wait_for_steps(process, tmp_path / "run" / "metrics.jsonl", 3)
    process.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever was on disk is all there is
    process.wait()
    resumed = start(config, "--resume")
    out, err = resumed.communicate(timeout=HANG)
    assert resumed.returncode == 0, err
    assert "resuming from" in out and "warm-up" not in out.split("resuming from")[1]

    whole = read_metrics(uninterrupted / "metrics.jsonl")
    again = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in again] == [r["epoch"] for r in whole]
    assert max(r["epoch"] for r in whole) >= 2  # the runs crossed epoch boundaries
    assert comparable(again) == comparable(whole)
    a, b = final_tensors(uninterrupted), final_tensors(tmp_path / "run")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(r["reward_std"] > 0 for r in whole)  # the runs had a learning signal to diverge on


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_a_checkpoint_and_resume_matches(uninterrupted, tiny_model_path, tmp_path, signum):
    config = write_config(tmp_path, tiny_model_path)
    process = start(config, "--save-every", "100")  # only the signal (or the end) makes a checkpoint
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for_steps(process, metrics, 2)
    process.send_signal(signum)
    out, err = process.communicate(timeout=HANG)
    assert process.returncode == 128 + signum, err
    stopped_at = len(metrics.read_text().splitlines())
    assert f"stopped by {signal.Signals(signum).name} after step {stopped_at}: checkpoint saved" in err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [f"step-{stopped_at:06d}"]

    resumed = start(config, "--resume")
    out, err = resumed.communicate(timeout=HANG)
    assert resumed.returncode == 0, err
    assert comparable(read_metrics(metrics)) == comparable(read_metrics(uninterrupted / "metrics.jsonl"))
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS


def test_ctrl_c_during_the_warm_up_saves_a_warm_up_checkpoint_and_resume_matches(
    uninterrupted, tiny_model_path, tmp_path
):
    config = write_config(tmp_path, tiny_model_path)
    process = start(config)
    for line in process.stdout:  # rendezvous: the warm-up is under way (30 of its 40 steps to go)
        if line.startswith("warm-up 10/40"):
            break
    else:
        raise AssertionError(process.communicate())
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=HANG)
    assert process.returncode == 130, err
    assert "SIGINT: finishing warm-up step " in out
    checkpoints = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("warmup-"), checkpoints
    done = int(checkpoints[0].removeprefix("warmup-"))
    assert f"stopped by SIGINT during the warm-up, after warm-up step {done} of 40: checkpoint saved" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no RL step yet
    state = json.loads((tmp_path / "run" / "checkpoints" / checkpoints[0] / "trainer_state.json").read_text())
    assert state["warmup"]["done"] == done and state["step"] == 0

    resumed = start(config, "--resume")
    out, err = resumed.communicate(timeout=HANG)
    assert resumed.returncode == 0, err
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / checkpoints[0]} at warm-up step {done} of 40" in out
    assert "warm-up 40/40" in out and (done >= 10 or "warm-up 10/40" in out)
    assert comparable(read_metrics(tmp_path / "run" / "metrics.jsonl")) == comparable(
        read_metrics(uninterrupted / "metrics.jsonl")
    )
    a, b = final_tensors(uninterrupted), final_tensors(tmp_path / "run")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
