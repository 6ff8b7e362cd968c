"""Resuming from checkpoints: a restored run continues exactly, and checkpoints are found
and checked against the config before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlaif_mlx.config import load_config
from rlaif_mlx.data.tasks import load_tasks
from rlaif_mlx.monitor.metrics import JsonlSink, read_metrics
from rlaif_mlx.rewards.pipeline import RewardResult
from rlaif_mlx.training.checkpoint import CheckpointError, config_differences, find_checkpoint
from rlaif_mlx.training.trainer import ScoringFailed, Trainer

TASKS = [
    {"id": "add", "prompt": "Write add(a, b).", "reference": "def add(a, b):\n    return a + b\n", "difficulty": 1},
    {"id": "neg", "prompt": "Write neg(x).", "reference": "def neg(x):\n    return -x\n", "difficulty": 1},
    {"id": "sq", "prompt": "Write sq(x).", "reference": "def sq(x):\n    return x * x\n", "difficulty": 2},
    {"id": "inc", "prompt": "Write inc(x).", "reference": "def inc(x):\n    return x + 1\n", "difficulty": 2},
]
TIMING_KEYS = ("_seconds", "tokens_per_second")


def make_config(tmp_path: Path, model_path: Path, run: str, *, ahead: bool = False, **training):
    """A tiny run touching every piece of trainer state: warm-up + rebased reference,
    adaptive KL, an EMA baseline and a curriculum that changes bucket mid-run."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    config = {
        "seed": 5,
        "backend": "torch",
        "output_dir": str(tmp_path / run),
        "model": {"base_model": str(model_path), "use_lora": True, "lora_r": 4},
        "data": {"train_file": str(tasks)},
        # constant + warm-up: the LR still changes each step, but not with max_steps,
        # so a shorter first leg sees the same LRs as the uninterrupted run
        "training": {
            "max_steps": 4,
            "batch_size": 2,
            "micro_batch_size": 4,
            "learning_rate": 1e-2,
            "lr_scheduler_type": "constant",
            "warmup_steps": 3,
            "save_steps": 2,
            "save_total_limit": 2,
            "sft_warmup_steps": 2,
            "sft_batch_size": 2,
            **training,
        },
        "rlaif": {
            "num_samples_per_prompt": 2,
            "max_new_tokens": 16,
            "baseline": "ema",
            "kl_penalty": 0.1,
            "sample_ahead": ahead,
        },
        "curriculum": {"enabled": True, "num_buckets": 2, "advance_after_steps": 2, "mix_previous": 0.5},
    }
    path = tmp_path / f"{run}-{training.get('max_steps', 4)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


class _TextRewards:
    """Varied rewards read off the text alone, so every update is non-trivial and repeatable."""

    def score(self, items):
        return {uid: RewardResult((sum(map(ord, text)) % 11) / 10) for uid, _, text in items}


class _BrokenRewards:
    def score(self, items):
        return {uid: RewardResult(None, {}, "sandbox setup error: no namespaces") for uid, _, _ in items}


def make_trainer(config, rewards, log=lambda line: None) -> Trainer:
    from rlaif_mlx.backends.torch import create

    backend = create(config.model, config.training, seed=config.seed, total_steps=config.training.max_steps)
    return Trainer(
        config,
        backend=backend,
        train=load_tasks(config.data.train_file),
        rewards=rewards,
        output_dir=Path(config.output_dir),
        log=log,
    )


def numeric(records):
    return [
        {k: v for k, v in r.items() if isinstance(v, (int, float, type(None))) and not k.endswith(TIMING_KEYS)}
        for r in records
    ]


def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    found = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        if "optimizer" not in file.name:
            found.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return found


@pytest.mark.parametrize("ahead", [False, True], ids=["fresh-samples", "sample-ahead"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, tiny_model_path, ahead):
    """With ``sample_ahead`` the checkpoint also holds the next step's batch, sampled before it was saved."""
    whole = make_config(tmp_path, tiny_model_path, "whole", ahead=ahead)
    make_trainer(whole, _TextRewards()).run()

    # The first leg runs one step past its step-2 checkpoint, as if it crashed after
    # writing step 3's record: resuming from step 2 must drop that record.
    make_trainer(make_config(tmp_path, tiny_model_path, "part", ahead=ahead, max_steps=3), _TextRewards()).run()
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [1, 2, 3]
    lines: list[str] = []
    resumed = make_trainer(
        make_config(tmp_path, tiny_model_path, "part", ahead=ahead, max_steps=4), _TextRewards(), lines.append
    )
    resumed.restore(tmp_path / "part" / "checkpoints" / "step-000002")
    assert resumed.step == 2
    assert [r["step"] for r in resumed.run()] == [3, 4]
    assert not any("warm-up" in line for line in lines)  # the warm-up ran once, before step 1

    expected = numeric(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    got = numeric(read_metrics(tmp_path / "part" / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert {"reward_mean", "loss", "kl", "kl_coef", "grad_norm", "lr", "curriculum_bucket"} <= set(got[0])
    # sampling ahead draws step k+1's prompts during step k, so the curriculum moves a step earlier
    assert [r["curriculum_bucket"] for r in got] == ([0, 1, 1, 1] if ahead else [0, 0, 1, 1])
    assert [r["sampled_ahead"] for r in got] == ([0, 1, 1, 1] if ahead else [0, 0, 0, 0])
    assert len({r["lr"] for r in got}) == 3 and all(r["kl"] for r in got[1:])  # not trivially equal
    assert got == expected

    a = weights(tmp_path / "whole" / "checkpoints" / "step-000004")
    b = weights(tmp_path / "part" / "checkpoints" / "step-000004")
    assert any(k.startswith("adapter_model") for k in a) and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_resumed_run_keeps_counting_unscored_steps(tmp_path, tiny_model_path):
    first = make_config(tmp_path, tiny_model_path, "run", max_steps=2, sft_warmup_steps=0)
    make_trainer(first, _BrokenRewards()).run()  # 2 unscored steps: one short of stopping
    resumed = make_trainer(
        make_config(tmp_path, tiny_model_path, "run", max_steps=5, sft_warmup_steps=0), _BrokenRewards()
    )
    resumed.restore(find_checkpoint(tmp_path / "run"))
    with pytest.raises(ScoringFailed, match="3 consecutive steps"):
        resumed.run()
    assert resumed.step == 2  # the third unscored step in a row stops the run before it counts


def test_restore_refuses_a_config_that_changes_the_run(tmp_path, tiny_model_path):
    make_trainer(make_config(tmp_path, tiny_model_path, "run", max_steps=1, sft_warmup_steps=0), _TextRewards()).run()
    other = make_config(tmp_path, tiny_model_path, "run", max_steps=3, sft_warmup_steps=0, batch_size=4)
    trainer = make_trainer(other, _TextRewards())
    with pytest.raises(CheckpointError, match=r"different training\.batch_size \(see"):
        trainer.restore(find_checkpoint(tmp_path / "run"))
    assert trainer.step == 0


def test_config_differences_ignore_where_and_how_long_a_run_goes():
    saved = {
        "seed": 0,
        "output_dir": "a",
        "model": {"base_model": "m", "lora_r": 4, "torch": {"device": "cpu"}},
        "training": {"max_steps": 2, "batch_size": 2},
        "logging": {"log_every": 1},
        "rewards": {"weights": {"tests": 1.0}},
    }
    current = {
        "seed": 1,
        "output_dir": "b",
        "model": {"base_model": "n", "lora_r": 8, "torch": {"device": "cuda"}},
        "training": {"max_steps": 9, "batch_size": 2},
        "logging": {"log_every": 5},
        "rewards": {"weights": {"tests": 0.9, "parses": 0.1}},
    }
    assert config_differences(saved, current) == [
        "model.lora_r",
        "rewards.weights.parses",
        "rewards.weights.tests",
        "seed",
    ]
    assert config_differences(saved, saved) == []


def test_find_checkpoint_takes_a_checkpoint_or_a_run_folder(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for name in ("step-000002", "step-000010", ".tmp-step-000011"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text("{}")
    (root / "step-000012").mkdir()  # no state file: a checkpoint still being written
    assert find_checkpoint(root / "step-000002") == root / "step-000002"
    assert find_checkpoint(tmp_path / "run") == root / "step-000010"
    assert find_checkpoint(root) == root / "step-000010"
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'empty'}: no checkpoint found") as err:
        find_checkpoint(tmp_path / "empty")
    assert "\n" not in str(err.value)


def test_metrics_log_keeps_records_up_to_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')  # torn write
    sink = JsonlSink(path, truncate_after_step=2)
    sink.write({"step": 3, "loss": 0.5})
    sink.close()
    assert read_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5}]


def test_an_epoch_boundary_checkpoint_resumes_into_the_next_epoch(tmp_path, tiny_model_path):
    """4 tasks, 2 per step, curriculum off: an epoch is 2 steps and the step-2 checkpoint sits on its boundary."""
    whole = make_config(tmp_path, tiny_model_path, "whole", max_steps=4, sft_warmup_steps=0)
    whole.curriculum.enabled = False
    drawn: list[list[str]] = []
    trainer = make_trainer(whole, _TextRewards())
    sample = trainer.sample
    trainer.sample = lambda tasks, **kw: drawn.append([t.id for t in tasks]) or sample(tasks, **kw)
    records = trainer.run()
    assert [r["epoch"] for r in records] == [0, 1, 1, 2]  # epoch counts finished passes after each step
    assert sorted(drawn[0] + drawn[1]) == sorted(drawn[2] + drawn[3]) == sorted(t["id"] for t in TASKS)

    part = make_config(tmp_path, tiny_model_path, "part", max_steps=4, sft_warmup_steps=0)
    part.curriculum.enabled = False
    first = make_trainer(part, _TextRewards())
    first.total_steps = 2  # stop on the boundary (the config keeps max_steps 4, so the LR schedule matches)
    first.run()
    resumed = make_trainer(part, _TextRewards())
    resumed.restore(tmp_path / "part" / "checkpoints" / "step-000002")
    again: list[list[str]] = []
    sample = resumed.sample
    resumed.sample = lambda tasks, **kw: again.append([t.id for t in tasks]) or sample(tasks, **kw)
    rest = resumed.run()
    assert again == drawn[2:]  # the next epoch's batches, not a skipped or repeated one
    assert [r["epoch"] for r in rest] == [1, 2]
    assert numeric(rest) == numeric(records[2:])
