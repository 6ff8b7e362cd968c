"""The metric sinks: TensorBoard scalars, saved samples, and both written by a real run.

TensorBoard itself is not installed, so the event files are read back here by
hand: TFRecord framing (checked with its CRCs) around ``Event`` protos, with
TensorBoard's rule for a restarted run applied (a ``SessionLog.START`` at step
``s`` hides the events read before it at steps ``>= s``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.backends.base import Completion
from rlaif_mlx.config import load_config
from rlaif_mlx.data.tasks import Task, load_tasks
from rlaif_mlx.monitor.metrics import SampleSink, TensorBoardSink, read_metrics, read_samples, sample_rows
from rlaif_mlx.rewards.pipeline import RewardResult
from rlaif_mlx.training.trainer import Trainer


def read_events(log_dir: Path) -> list:
    """Every event of every event file in ``log_dir``, in file-name order (as TensorBoard loads them)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header), path
            payload = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(payload), path
            events.append(Event.FromString(payload))
            pos += 16 + length
    return events


def scalars(events) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard shows them once a restart's purge is applied."""
    from tensorboardX.proto.event_pb2 import SessionLog

    seen: list[tuple[str, int, float]] = []
    for event in events:
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            seen = [s for s in seen if s[1] < event.step]
        seen += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    found: dict[str, dict[int, float]] = {}
    for tag, step, value in seen:
        found.setdefault(tag, {})[step] = value
    return found


# ---- TensorBoardSink ----------------------------------------------------------


def test_tensorboard_sink_writes_numbers_at_their_step_and_skips_the_rest(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    for step in (1, 2):
        sink.write(
            {
                "step": step,
                "loss": 0.5 * step,
                "reward/tests": 0.25,
                "teacher/calls": 3 * step,
                "reward_mean": float("nan") if step == 2 else 0.75,
                "grad_norm": math.inf,
                "model": "tiny",
                "update_skipped": True,
                "missing": None,
            }
        )
    sink.close()

    [event_file] = (tmp_path / "tb").iterdir()
    assert event_file.stat().st_size > 0
    got = scalars(read_events(tmp_path / "tb"))
    assert set(got) == {"loss", "reward/tests", "teacher/calls", "reward_mean"}
    assert got["loss"] == {1: 0.5, 2: 1.0}
    assert got["reward/tests"] == {1: 0.25, 2: 0.25}
    assert got["teacher/calls"] == {1: 3.0, 2: 6.0}
    assert got["reward_mean"][1] == 0.75 and math.isnan(got["reward_mean"][2])  # NaN kept: nothing scored


def test_a_resumed_tensorboard_sink_hides_the_events_after_its_checkpoint(tmp_path):
    first = TensorBoardSink(tmp_path / "tb")
    for step in (1, 2, 3):  # crashed after step 3, resumed from the step-2 checkpoint
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path / "tb", purge_step=3)
    for step in (3, 4):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()

    events = read_events(tmp_path / "tb")
    assert len(list((tmp_path / "tb").iterdir())) == 2  # a second file, not the first one overwritten
    raw = [(e.step, v.simple_value) for e in events for v in e.summary.value]
    assert raw == [(1, 1.0), (2, 2.0), (3, 3.0), (3, 30.0), (4, 40.0)]  # the purge is TensorBoard's, on reading
    assert scalars(events)["loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}


# ---- SampleSink ---------------------------------------------------------------


def completion(uid: str, prompt_index: int, sample_index: int, text: str, n_tokens: int) -> Completion:
    return Completion(uid, prompt_index, sample_index, (1, 2), tuple(range(n_tokens)), (0.0,) * n_tokens, text, "eos")


def test_sample_rows_take_each_result_by_uid(tmp_path):
    tasks = [Task(id="add", prompt="Write add(a, b)."), Task(id="neg", prompt="Write neg(x).")]
    completions = [
        completion("u0", 0, 0, "def add", 2),
        completion("u1", 0, 1, "pass", 1),
        completion("u2", 1, 0, "def neg", 3),
    ]
    # In another order than the completions: a lookup by position would mix them up.
    results = {
        "u2": RewardResult(0.5, {"tests": 0.5, "judge": float("nan")}, kind="failed", suspect=("walks frames",)),
        "u1": RewardResult(None, {}, "sandbox timed out", kind="infrastructure"),
        "u0": RewardResult(1.0, {"tests": 1.0, "judge": 0.9}, kind="passed"),
    }
    sink = SampleSink(tmp_path / "samples.jsonl", truncate_after_step=0)
    sink.write_step(1, sample_rows(tasks, completions, results))
    sink.close()

    rows = read_samples(tmp_path / "samples.jsonl")
    assert rows == [
        {
            "step": 1,
            "task_id": "add",
            "uid": "u0",
            "prompt": "Write add(a, b).",
            "completion": "def add",
            "finish_reason": "eos",
            "num_tokens": 2,
            "reward": 1.0,
            "tests": 1.0,
            "judge": 0.9,
            "error": None,
            "grade": "passed",
            "suspect": [],
        },
        {
            "step": 1,
            "task_id": "add",
            "uid": "u1",
            "prompt": "Write add(a, b).",
            "completion": "pass",
            "finish_reason": "eos",
            "num_tokens": 1,
            "reward": None,
            "error": "sandbox timed out",
            "grade": "infrastructure",
            "suspect": [],
        },
        {
            "step": 1,
            "task_id": "neg",
            "uid": "u2",
            "prompt": "Write neg(x).",
            "completion": "def neg",
            "finish_reason": "eos",
            "num_tokens": 3,
            "reward": 0.5,
            "tests": 0.5,
            "judge": None,
            "error": None,
            "grade": "failed",
            "suspect": ["walks frames"],
        },
    ]


def test_sample_sink_reopened_keeps_lines_up_to_the_restored_step(tmp_path):
    path = tmp_path / "samples.jsonl"
    sink = SampleSink(path, truncate_after_step=0)
    for step in (1, 2, 3):
        sink.write_step(step, [{"uid": f"{step}-a"}, {"uid": f"{step}-b"}])
    sink.close()
    with path.open("a") as f:
        f.write('{"step": 4, "uid": "4-')  # a crash mid-write
    sink = SampleSink(path, truncate_after_step=2)
    sink.write_step(3, [{"uid": "3-new"}])
    sink.close()
    assert [(r["step"], r["uid"]) for r in read_samples(path)] == [
        (1, "1-a"),
        (1, "1-b"),
        (2, "2-a"),
        (2, "2-b"),
        (3, "3-new"),
    ]


# ---- a real run -----------------------------------------------------------------


class _ReversedTextRewards:
    """Rewards read off the text, returned in reverse order: only a lookup by uid gets them right."""

    def score(self, items):
        return {uid: RewardResult(text_reward(text), {"tests": text_reward(text)}) for uid, _, text in reversed(items)}


def text_reward(text: str) -> float:
    return (sum(map(ord, text)) % 11) / 10


def run_config(tmp_path: Path, model_path: Path, max_steps: int):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": i, "prompt": f"Write {i}(x)."}) + "\n" for i in ("inc", "neg", "sq")))
    config = {
        "seed": 1,
        "backend": "torch",
        "output_dir": str(tmp_path / "run"),
        "model": {"base_model": str(model_path), "use_lora": True, "lora_r": 4},
        "data": {"train_file": str(tasks)},
        "training": {
            "max_steps": max_steps,
            "batch_size": 2,
            "micro_batch_size": 4,
            "learning_rate": 1e-3,
            "save_steps": 2,
            "save_total_limit": 2,
        },
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 8},
        "logging": {"tensorboard": True, "dashboard": False},
    }
    path = tmp_path / f"run-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def make_trainer(config) -> Trainer:
    from rlaif_mlx.backends.torch import create

    backend = create(config.model, config.training, seed=config.seed, total_steps=config.training.max_steps)
    return Trainer(
        config,
        backend=backend,
        train=load_tasks(config.data.train_file),
        rewards=_ReversedTextRewards(),
        output_dir=Path(config.output_dir),
        log=lambda line: None,
    )


def test_a_run_writes_tensorboard_events_and_every_sample_with_its_reward(tmp_path, tiny_model_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    make_trainer(run_config(tmp_path, tiny_model_path, max_steps=3)).run()
    resumed = make_trainer(run_config(tmp_path, tiny_model_path, max_steps=3))
    resumed.restore(run / "checkpoints" / "step-000002")  # as after a crash past step 2
    resumed.run()  # writes step 3 again

    records = read_metrics(run / "metrics.jsonl")
    samples = read_samples(run / "samples.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4 + [3] * 4  # batch 2 x G 2, step 3 once
    keys = ["step", "task_id", "uid", "prompt", "completion", "finish_reason", "num_tokens", "reward", "tests", "error"]
    keys += ["grade", "suspect"]
    assert all(list(s) == keys and s["error"] is None and s["suspect"] == [] for s in samples)
    for s in samples:
        assert s["reward"] == s["tests"] == text_reward(s["completion"])  # this text's reward, not a neighbour's
        assert s["prompt"] == f"Write {s['task_id']}(x)." and 1 <= s["num_tokens"] <= 8
    for record in records:
        rewards = [s["reward"] for s in samples if s["step"] == record["step"]]
        assert record["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert len({s["uid"] for s in samples if s["step"] == 1}) == 4

    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the first leg's and the resumed one
    events = read_events(run / "tensorboard")
    assert [e.step for e in events if e.HasField("session_log")] == [3]  # the resumed leg purges from its first step
    shown = scalars(events)
    assert {"reward_mean", "reward/tests", "reward/suspect", "loss", "kl", "lr"} <= set(shown)
    assert shown["reward_mean"] == pytest.approx({r["step"]: r["reward_mean"] for r in records})
    assert shown["loss"] == pytest.approx({r["step"]: r["loss"] for r in records})
