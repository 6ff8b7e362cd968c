"""Nothing is lost: one run per output folder, refused or moved aside, pruning only a run's own
checkpoints, metrics appended and cut back only on resume, and a failed start leaves no folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.cli import main
from rlaif_mlx.monitor.metrics import read_metrics, read_samples

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
TASKS = [
    {"id": f"t{i}", "prompt": f"Write f{i}(x).", "reference": f"def f{i}(x):\n    return x + {i}\n"} for i in range(4)
]


def write_config(folder: Path, model: Path, **training) -> Path:
    """A LoRA run without warm-up: 2 prompts x 2 samples a step, a checkpoint every step, one kept."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = folder / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    config = {
        "seed": 3,
        "backend": "torch",
        "output_dir": str(folder / "run"),
        "model": {"base_model": str(model), "use_lora": True, "lora_r": 4},
        "data": {"train_file": str(tasks)},
        "training": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 4, "save_steps": 1, "save_total_limit": 1}
        | training,
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 8},
        "rewards": {"test_timeout_s": 5},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err), err
    return err


def test_the_quickstart_command_twice_keeps_the_first_run(tmp_path, tiny_model_path, capsys):
    """The first run is stopped by Ctrl-C once it has started (its warm-up is 110 steps); the same
    command again is refused, and not a byte of the first run changes."""
    run = tmp_path / "quickstart"
    argv = ["train", "--config", str(QUICKSTART), "--model", str(tiny_model_path), "--output-dir", str(run)]
    argv += ["--backend", "torch", "--no-dashboard"]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "rlaif_mlx.cli", *argv], env=env, stderr=subprocess.PIPE, text=True)
    while not (run / "run.json").exists():  # written once the run is set up, before its first step
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=1800)
    assert first.returncode == 130, err
    assert "stopped by SIGINT during the warm-up, after warm-up step" in err
    files = snapshot(run)
    assert {"config.yaml", "run.json"} <= set(files) and any(n.startswith("checkpoints/warmup-") for n in files)

    assert main(argv) == 2  # the same command again
    [err] = error_lines(capsys)
    assert err.startswith(f"error: {run} already holds a run (config.yaml, checkpoints, run.json)")
    assert "continue it with --resume" in err and f"--overwrite (moves the old run to {run}.old-1" in err
    assert snapshot(run) == files  # not a byte changed
    assert not (tmp_path / "quickstart.old-1").exists()


def test_overwrite_moves_the_old_run_aside_and_pruning_spares_other_runs(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 0
    first = snapshot(run)
    (run / "notes.txt").write_text("mine")  # not a run file: it stays where it is
    assert main(["train", "--config", str(config), "--overwrite", "--seed", "4"]) == 0
    assert f"moved the earlier run in {run} to {tmp_path / 'run.old-1'} (--overwrite)" in capsys.readouterr().out
    assert snapshot(tmp_path / "run.old-1") == first
    assert (run / "notes.txt").read_text() == "mine"
    old_id = json.loads((tmp_path / "run.old-1" / "run.json").read_text())["run_id"]
    new_id = json.loads((run / "run.json").read_text())["run_id"]
    assert old_id != new_id

    # A checkpoint of another run in this folder is never pruned by this one.
    shutil.copytree(tmp_path / "run.old-1" / "checkpoints" / "step-000002", run / "checkpoints" / "step-000001")
    assert main(["train", "--config", str(config), "--seed", "4", "--resume", "--max-steps", "4"]) == 0
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["step-000001", "step-000004"]  # the other run's, and this run's newest (save_total_limit 1)
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["run_id"] == new_id


def test_resume_appends_and_cuts_back_only_to_the_resumed_step(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path, max_steps=3, save_total_limit=3)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 0
    before = read_metrics(run / "metrics.jsonl")
    capsys.readouterr()
    argv = ["train", "--config", str(config), "--resume", str(run / "checkpoints" / "step-000002")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    after = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3]  # step 3 again, not twice
    assert after[:2] == before[:2]  # the records before the resumed step are untouched
    assert [s["step"] for s in read_samples(run / "samples.jsonl")] == [1] * 4 + [2] * 4 + [3] * 4
    assert "done: 3 steps (step 3 in this session) in " in out  # the summary covers the whole run
    assert "mean reward of the first step " in out and ", of the last step " in out  # not "first 1 steps"


def test_resume_into_a_folder_holding_another_run_is_refused(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path)
    assert main(["train", "--config", str(config)]) == 0
    other = write_config(tmp_path / "other", tiny_model_path)
    assert main(["train", "--config", str(other)]) == 0
    before = snapshot(tmp_path / "other" / "run")
    capsys.readouterr()
    argv = ["train", "--config", str(other), "--resume", str(tmp_path / "run"), "--max-steps", "3"]
    assert main(argv) == 2
    [err] = error_lines(capsys)
    assert f"{tmp_path / 'other' / 'run'} holds another run" in err and "--overwrite" in err
    assert snapshot(tmp_path / "other" / "run") == before


@pytest.mark.parametrize(
    "change",
    ["missing model", "not a model", "no tokenizer", "missing tasks", "output is a file", "output under a file"],
)
def test_a_failed_start_is_one_line_and_leaves_no_output_folder(tmp_path, tiny_model_path, capsys, change):
    config = write_config(tmp_path, tiny_model_path)
    raw = yaml.safe_load(config.read_text())
    run = Path(raw["output_dir"])
    if change == "missing model":
        raw["model"]["base_model"] = "./models/nothing-here"
        expected = "error: model.base_model: ./models/nothing-here does not exist; point model.base_model at"
    elif change == "not a model":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "config.json").write_text("{}")
        raw["model"]["base_model"] = str(tmp_path / "folder")
        expected = f"error: model.base_model: {tmp_path / 'folder' / 'config.json'} names no model_type"
    elif change == "no tokenizer":
        shutil.copytree(tiny_model_path, tmp_path / "model", ignore=shutil.ignore_patterns("tokenizer*"))
        raw["model"]["base_model"] = str(tmp_path / "model")
        expected = f"error: model.base_model: {tmp_path / 'model'} holds no tokenizer (tokenizer.json,"
    elif change == "missing tasks":
        raw["data"]["train_file"] = str(tmp_path / "gone.jsonl")
        expected = f"error: {tmp_path / 'gone.jsonl'}: cannot read task file"
    elif change == "output is a file":
        run.write_text("")
        expected = f"error: output_dir: {run} is a file; point output_dir elsewhere"
    else:
        (tmp_path / "blocker").write_text("")
        run = tmp_path / "blocker" / "run"
        raw["output_dir"] = str(run)
        expected = f"error: output_dir: {tmp_path / 'blocker'} is a file, so {run} cannot be made"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 2
    [err] = error_lines(capsys)
    assert err.startswith(expected), err
    assert not run.is_dir()
