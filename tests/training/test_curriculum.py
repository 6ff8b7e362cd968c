"""Curriculum buckets, progression, rehearsal mix, plain epochs and exact resume; the shipped configs
reach their last bucket."""

import json
import math
from pathlib import Path

import pytest

from rlaif_mlx.config import ConfigError, load_config
from rlaif_mlx.data.tasks import load_tasks
from rlaif_mlx.training.curriculum import DEFAULT_PASSES, Curriculum, curriculum_from_config, estimate_difficulty
from rlaif_mlx.training.trainer import total_optimizer_steps

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

IDS = [f"t{i}" for i in range(6)]


def test_quantile_buckets():
    cur = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_after_steps=1)
    assert cur.num_buckets == 3
    assert [cur.bucket_task_ids(b) for b in range(3)] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]
    # Ties stay together: quantile edges of [1,1,1,2,2,3] at 1/3, 2/3 are 1 and 2.
    tied = Curriculum(IDS, [1, 1, 1, 2, 2, 3], num_buckets=3, advance_after_steps=1)
    assert [tied.bucket_task_ids(b) for b in range(3)] == [["t0", "t1", "t2"], ["t3", "t4"], ["t5"]]
    # All equal: one bucket, however many were asked for.
    assert Curriculum(IDS, [2] * 6, num_buckets=4).num_buckets == 1


def test_progression_by_step_budget():
    cur = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_after_steps=2, seed=1)
    seen = []
    for _ in range(7):
        batch = cur.next_batch(2)
        seen.append((cur.bucket, set(batch)))
    assert [b for b, _ in seen] == [0, 0, 1, 1, 2, 2, 2]  # the last bucket is kept
    # Within a bucket of 2 and batch 2, each batch is the whole bucket.
    assert seen[0][1] == {"t0", "t1"} and seen[2][1] == {"t2", "t3"} and seen[4][1] == {"t4", "t5"}
    assert cur.stats()["steps_in_bucket"] == 3


def test_progression_by_threshold():
    cur = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_threshold=0.5, window=2)
    cur.next_batch(2)
    cur.record("t0", 0.9)
    cur.record("t1", 1.0)  # window [0.9, 1.0] ...
    cur.record("t0", 0.1)
    cur.record("t1", 0.3)  # ... only the last 2 count: [0.1, 0.3], mean 0.2 < 0.5
    cur.next_batch(2)
    assert cur.bucket == 0
    cur.record("t5", 1.0)  # another bucket's task: not counted
    cur.record("t0", float("nan"))  # unscored: ignored
    assert cur.stats()["window_count"] == 2
    cur.record("t0", 0.9)
    assert cur.bucket == 0  # progression is checked by next_batch
    cur.record("t1", 0.8)  # window [0.9, 0.8] mean 0.85
    batch = cur.next_batch(2)
    assert cur.bucket == 1 and set(batch) == {"t2", "t3"}
    assert cur.stats()["window_count"] == 0  # a fresh window for the new bucket
    with pytest.raises(ValueError, match="Unknown task id"):
        cur.record("nope", 1.0)


def test_without_replacement_within_bucket_epoch():
    ids = [f"t{i}" for i in range(8)]
    cur = Curriculum(ids, [1, 1, 1, 1, 2, 2, 2, 2], num_buckets=2, advance_after_steps=100, seed=3)
    first = cur.next_batch(2) + cur.next_batch(2)
    assert sorted(first) == ["t0", "t1", "t2", "t3"]
    assert (cur.epoch, cur.cursor) == (1, 0)  # one full pass over the bucket
    nxt = cur.next_batch(3)
    assert len(set(nxt)) == 3 and set(nxt) <= {"t0", "t1", "t2", "t3"}
    assert (cur.epoch, cur.cursor) == (1, 3)


def test_mix_previous():
    cur = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_after_steps=1, mix_previous=0.5, seed=0)
    assert set(cur.next_batch(4)) <= {"t0", "t1"}  # bucket 0: nothing easier to mix in
    batch = cur.next_batch(4)  # bucket 1: 2 from {t2,t3}, 2 from {t0,t1}
    assert sorted(batch[:2]) == ["t2", "t3"] and sorted(batch[2:]) == ["t0", "t1"]
    batch = cur.next_batch(4)  # bucket 2: review pool is buckets 0 and 1
    assert sorted(batch[:2]) == ["t4", "t5"] and set(batch[2:]) <= {"t0", "t1", "t2", "t3"}


def _drive(cur, steps):
    out = []
    for i in range(steps):
        batch = cur.next_batch(3)
        for j, t in enumerate(batch):
            cur.record(t, ((i + j) % 4) / 3)
        out.append(batch)
    return out


@pytest.mark.parametrize("enabled", [True, False])
def test_state_round_trip_gives_identical_batches(enabled):
    ids = [f"t{i}" for i in range(10)]
    diffs = list(range(10))
    kw = dict(enabled=enabled, num_buckets=3, advance_threshold=0.5, window=4, mix_previous=0.34)
    cur = Curriculum(ids, diffs, seed=7, **kw)
    _drive(cur, 5)
    state = json.loads(json.dumps(cur.state_dict()))  # survives a JSON checkpoint
    expected = _drive(cur, 8)
    resumed = Curriculum(ids, diffs, seed=12345, **kw)  # a different seed: the RNG state is restored
    resumed.load_state_dict(state)
    assert _drive(resumed, 8) == expected
    assert resumed.stats() == cur.stats()


def test_load_rejects_other_tasks():
    cur = Curriculum(IDS, [1, 2, 3, 4, 5, 6], advance_after_steps=1)
    other = Curriculum(IDS[:5], [1, 2, 3, 4, 5], advance_after_steps=1)
    with pytest.raises(ValueError, match="different task list"):
        other.load_state_dict(cur.state_dict())


def test_plain_epochs():
    ids = [f"t{i}" for i in range(5)]
    cur = Curriculum(ids, enabled=False, seed=0)
    draws = []
    for _ in range(5):
        draws += cur.next_batch(2)
    assert (cur.epoch, cur.cursor) == (2, 0)  # 10 draws = two full epochs over 5 tasks
    assert sorted(draws[:5]) == ids and sorted(draws[5:]) == ids
    cur2 = Curriculum(ids, enabled=False, seed=0)
    cur2.next_batch(2)
    cur2.next_batch(2)
    assert (cur2.epoch, cur2.cursor) == (0, 4)
    last = cur2.next_batch(2)  # crosses the epoch boundary
    assert (cur2.epoch, cur2.cursor) == (1, 1)
    assert last[0] == draws[4] and last[1] == draws[5]  # same seed, same order
    assert cur2.bucket == 0 and cur2.num_buckets == 1


def test_missing_difficulties():
    with pytest.raises(ValueError, match="estimates"):
        Curriculum(IDS[:4], [1, None, 3, None], advance_after_steps=1)
    # Estimates ranked 1, 3, 2, 0 of 4 -> quantiles 1/3, 1, 2/3, 0 of the labelled [1, 3]:
    # t1 (quantile 1) -> 3, t3 (quantile 0) -> 1. Difficulties [1, 3, 3, 1].
    cur = Curriculum(IDS[:4], [1, None, 3, None], estimates=[0.1, 100, 0.2, 0.0], num_buckets=2, advance_after_steps=1)
    assert cur.bucket_task_ids(0) == ["t0", "t3"] and cur.bucket_task_ids(1) == ["t1", "t2"]
    # Nothing labelled: the estimates are the difficulties.
    cur = Curriculum(IDS[:4], None, estimates=[4, 3, 2, 1], num_buckets=2, advance_after_steps=1)
    assert cur.bucket_task_ids(0) == ["t2", "t3"]


def test_config_errors():
    with pytest.raises(ValueError, match="unique"):
        Curriculum(["a", "a"], enabled=False)
    with pytest.raises(ValueError, match="mix_previous"):
        Curriculum(IDS, enabled=False, mix_previous=1.0)


def test_estimate_difficulty_orders_by_size():
    easy = estimate_difficulty("Return the sum of a and b.", "def f(a, b):\n    return a + b\n", "assert f(1, 2) == 3")
    hard = estimate_difficulty(
        "Parse an arithmetic expression with parentheses and operator precedence and evaluate it.",
        "\n".join(["def parse(s):"] + ["    if x:\n        for y in z:\n            pass"] * 10),
        "\n".join(["assert parse('1+2') == 3"] * 12),
    )
    assert 0 <= easy < hard
    assert estimate_difficulty("short") < estimate_difficulty("a much longer prompt with many more words in it")
    assert isinstance(estimate_difficulty("x", None, None), float)


def test_a_bucket_the_threshold_never_passes_is_left_after_two_passes():
    """Buckets of 2, batch 1, a reward of 0.5 under a threshold of 0.7: 2 passes = 4 steps a bucket."""
    cur = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_threshold=0.7, window=1, seed=2)
    buckets = []
    for _ in range(10):
        (task,) = cur.next_batch(1)
        buckets.append(cur.bucket)
        cur.record(task, 0.5)
    assert DEFAULT_PASSES == 2
    assert buckets == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # the last bucket is kept
    # Reaching the threshold still moves on at once: the budget is a bound, not a schedule.
    fast = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_threshold=0.7, window=1, seed=2)
    (task,) = fast.next_batch(1)
    fast.record(task, 0.9)
    fast.next_batch(1)
    assert fast.bucket == 1
    # An explicit step budget replaces the default one, also when it is longer.
    slow = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_after_steps=6, seed=2)
    assert [(slow.next_batch(1), slow.bucket)[1] for _ in range(7)] == [0] * 6 + [1]


@pytest.mark.parametrize("mix", [0.6, 0.9, 0.99])
def test_every_batch_draws_the_current_bucket(mix):
    cur = Curriculum(IDS, [1, 2, 3, 4, 5, 6], num_buckets=3, advance_after_steps=1, mix_previous=mix, seed=0)
    for _ in range(6):
        batch = cur.next_batch(1)  # round(mix * 1) = 1 would leave nothing for the current bucket
        assert batch[0] in cur.bucket_task_ids(cur.bucket)
    # batch 4: round(0.6 * 4) = 2 rehearsal draws; round(3.6) = round(3.96) = 4 are capped at 3
    current = {0.6: 2, 0.9: 1, 0.99: 1}[mix]
    batch = cur.next_batch(4)
    assert set(batch[:current]) <= {"t4", "t5"} and set(batch[current:]) <= set(IDS[:4])


def test_the_config_refuses_a_batch_of_rehearsal_only(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {base_model: m}\ndata: {train_file: t.jsonl}\ncurriculum: {mix_previous: 1.0}\n")
    with pytest.raises(ConfigError, match="curriculum.mix_previous: Input should be less than 1"):
        load_config(path)


@pytest.mark.parametrize("name", ["laptop.yaml", "cuda-server.yaml", "quickstart.yaml"])
def test_the_shipped_configs_reach_their_last_bucket(name):
    """A steady reward of 0.5 (under laptop's and cuda-server's threshold of 0.7) for the run's length.

    56 tasks in buckets of 21, 21 and 14 by difficulty. laptop: 3 epochs at batch 4 = 42 steps; a bucket
    of 21 is left after 2 passes = 42 draws = 11 steps (10.5, rounded up), so the last bucket starts at
    step 22. cuda-server: 3 epochs at batch 16 = 12 steps; 42 draws take 3 steps, the last bucket starts
    at step 6. quickstart: the curriculum is off, its one "bucket" is all 56 tasks.
    (Before, with no step budget, both stayed in bucket 0 for the whole run on 21 of the 56 tasks.)
    """
    cfg = load_config(CONFIGS / name)
    tasks = load_tasks(cfg.data.train_file).tasks
    cur = curriculum_from_config(cfg.curriculum, tasks, seed=cfg.seed)
    total = total_optimizer_steps(cfg, len(tasks))
    seen, first_step_in = set(), {}
    for step in range(total):
        batch = cur.next_batch(cfg.training.batch_size)
        first_step_in.setdefault(cur.bucket, step)
        size = len(cur.bucket_task_ids(cur.bucket))
        if cur.bucket < cur.num_buckets - 1:  # the last bucket keeps the run
            assert cur.stats()["steps_in_bucket"] <= math.ceil(DEFAULT_PASSES * size / cfg.training.batch_size)
        seen |= set(batch)
        for task in set(batch):
            cur.record(task, 0.5)
    assert cur.bucket == cur.num_buckets - 1
    assert seen == {t.id for t in tasks}
    want = {"laptop.yaml": {0: 0, 1: 11, 2: 22}, "cuda-server.yaml": {0: 0, 1: 3, 2: 6}, "quickstart.yaml": {0: 0}}
    assert first_step_in == want[name]
    assert total == {"laptop.yaml": 42, "cuda-server.yaml": 12, "quickstart.yaml": 60}[name]
