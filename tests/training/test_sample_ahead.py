"""`rlaif.sample_ahead`: the next batch is sampled while this one is scored, from the policy before
this step's update, and trained on with the ratio against that policy."""

from __future__ import annotations

import threading

import numpy as np
import yaml
from test_trainer import TASKS, write_config

from rlaif_mlx.config import load_config
from rlaif_mlx.data.tasks import TaskSet
from rlaif_mlx.rewards.pipeline import RewardResult
from rlaif_mlx.training.trainer import Trainer


class _TextRewards:
    """Varied rewards read off the text, so every update moves the weights."""

    def score(self, items):
        return {uid: RewardResult((sum(map(ord, text)) % 11) / 10) for uid, _, text in items}


def _config(tmp_path, model_path, *, ahead: bool, max_steps: int = 3):
    path = write_config(tmp_path, model_path, max_steps=max_steps, learning_rate=5e-2)
    raw = yaml.safe_load(path.read_text())
    raw["rlaif"]["sample_ahead"] = ahead
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _trainer(cfg, rewards, out):
    from rlaif_mlx.backends.torch import create

    backend = create(cfg.model, cfg.training, seed=cfg.seed, total_steps=cfg.training.max_steps)
    return Trainer(cfg, backend=backend, train=TaskSet(TASKS, 0, "test"), rewards=rewards, output_dir=out)


def test_the_next_batch_is_sampled_by_the_policy_before_this_steps_update(tmp_path, tiny_model_path):
    cfg = _config(tmp_path, tiny_model_path, ahead=True)
    ahead = _trainer(cfg, _TextRewards(), tmp_path / "ahead")
    first = ahead.train_step()
    pending = ahead._pending
    assert first["sampled_ahead"] == 0 and pending.step == 1 and pending.sampled_at == 0

    # A trainer that never updated draws the same two batches with the same seeds: same samples.
    fresh = _trainer(cfg, _TextRewards(), tmp_path / "fresh")
    fresh.sample_batch()
    before_update = fresh.sample_batch(step=1)
    assert before_update.task_ids == pending.task_ids
    assert before_update.completions == pending.completions
    # ...and the updated policy would have sampled something else (so the check above can fail).
    after_update = ahead.sample(TaskSet(TASKS, 0, "test").tasks, step=1)
    assert [c.logprobs for c in after_update] != [c.logprobs for c in pending.completions]


def test_a_sampled_ahead_batch_is_trained_with_the_ratio_against_its_sampling_policy(tmp_path, tiny_model_path):
    cfg = _config(tmp_path, tiny_model_path, ahead=True)
    trainer = _trainer(cfg, _TextRewards(), tmp_path / "run")
    seen = []
    train_step = trainer.backend.train_step

    def spy(batch, **kwargs):
        seen.append(batch.old_logp)
        return train_step(batch, **kwargs)

    trainer.backend.train_step = spy
    trainer.train_step()
    pending = trainer._pending
    record = trainer.train_step()
    assert record["sampled_ahead"] == 1
    assert seen[0] is None  # fresh samples: the ratio is against the current policy (stop-gradient)
    # Stale samples: the ratio is against the log-probs recorded when they were sampled.
    for row, c in enumerate(pending.completions):
        start = len(c.prompt_ids) - 1
        np.testing.assert_array_equal(seen[1][row, start : start + len(c.logprobs)], np.float32(c.logprobs))


def test_scoring_overlaps_sampling_the_next_batch(tmp_path, tiny_model_path):
    """No timing: the graders wait until sampling starts while they are scoring."""
    trainer = _trainer(_config(tmp_path, tiny_model_path, ahead=True), None, tmp_path / "run")
    scoring, sampled_while_scoring = threading.Event(), threading.Event()
    sample = trainer.backend.sample

    def watched(prompts, *, n, params):
        if scoring.is_set():
            sampled_while_scoring.set()
        return sample(prompts, n=n, params=params)

    class WaitsForTheNextBatch:
        def score(self, items):
            scoring.set()
            # Sequential code would sample the next batch after scoring, and deadlock here: fail instead.
            assert sampled_while_scoring.wait(timeout=600), "scoring did not overlap the next batch's sampling"
            scoring.clear()
            return {uid: RewardResult(0.5) for uid, _, _ in items}

    trainer.rewards = WaitsForTheNextBatch()
    trainer.backend.sample = watched
    record = trainer.train_step()
    assert record["reward_mean"] == 0.5 and record["sample_ahead_seconds"] > 0
    assert trainer._pending.step == 1


def test_without_sample_ahead_every_batch_is_fresh(tmp_path, tiny_model_path):
    trainer = _trainer(_config(tmp_path, tiny_model_path, ahead=False), _TextRewards(), tmp_path / "run")
    records = [trainer.train_step() for _ in range(2)]
    assert trainer._pending is None
    assert [r["sampled_ahead"] for r in records] == [0, 0]


def test_a_saved_batch_is_whole_and_each_process_takes_back_its_share():
    """Under torchrun each process holds its share; the checkpoint holds the batch as one process would."""
    from dataclasses import dataclass

    from rlaif_mlx.backends.base import Completion
    from rlaif_mlx.training.distributed import DistContext
    from rlaif_mlx.training.sample_ahead import PendingBatch

    def completion(prompt, sample):
        return Completion(
            f"{prompt}-{sample}", prompt, sample, (1, 2), (3 + prompt, 4), (-0.5, -0.25), f"text {prompt}", "length"
        )

    shares = [
        PendingBatch(7, ["a", "b", "c", "d"], [completion(p, s) for p in range(2) for s in range(2)], 1.5, 6)
        for _ in range(2)
    ]
    shares[1].completions = [completion(p, s) for p in range(2) for s in range(2)]

    @dataclass(frozen=True)
    class TwoProcesses(DistContext):  # the gather of two processes, without launching them
        def all_gather(self, value):
            return [(2, shares[0].completions), (2, shares[1].completions)]

    state = shares[0].state_dict(TwoProcesses(rank=0, world_size=2))
    assert [c["uid"] for c in state["completions"]] == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1", "3-0", "3-1"]
    for rank in (0, 1):
        back = PendingBatch.from_state_dict(state, TwoProcesses(rank=rank, world_size=2))
        assert back.completions == shares[rank].completions and back.task_ids == ["a", "b", "c", "d"]
        assert (back.step, back.sampled_at, back.sample_seconds) == (7, 6, 1.5)
    whole = PendingBatch.from_state_dict(state, DistContext())  # resumed in one process: the whole batch
    assert [c.uid for c in whole.completions] == [c["uid"] for c in state["completions"]]
    assert whole.completions[4].completion_ids == (3, 4)
