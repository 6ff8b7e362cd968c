"""Which task ids go into the next batch: difficulty buckets, progression, exact resume.

With ``enabled=True`` tasks are split into difficulty buckets (quantiles of
difficulty, easiest first). Batches come from the current bucket, sampled
without replacement within an epoch over that bucket; the run moves to the
next bucket when the recent mean reward on the current bucket reaches
``advance_threshold``, or after ``advance_after_steps`` batches; without a
step budget, after ``DEFAULT_PASSES`` passes over the bucket's tasks, so a
bucket the threshold never passes cannot hold a run. Optionally a fraction
``mix_previous`` of each batch is drawn from the easier buckets already
passed, so old skills are rehearsed; every batch keeps at least one task of
the current bucket.

With ``enabled=False`` the same object yields plain shuffled epochs over
all tasks. Either way the order comes from one seeded ``numpy`` Generator
whose state is in ``state_dict()``: a resumed run draws the same batches.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import CurriculumConfig
from ..data.tasks import Task

DEFAULT_PASSES = 2  # passes over a bucket's tasks after which it is left, when no step budget is set
_BRANCH_WORDS = re.compile(r"\b(if|elif|else|for|while|try|except|with|match|case|switch|return|yield|lambda|class)\b")
_TEST_MARKERS = re.compile(r"\bassert\b|\bdef test_|\bexpect\(|\bassert_eq!|\bcheck\(")


def estimate_difficulty(prompt: str, reference: str | None = None, tests: str | None = None) -> float:
    """Cheap difficulty score for tasks that carry none; only its ORDER matters.

    Buckets are quantiles, so the scale is irrelevant; what matters is that
    bigger, more branched tasks rank higher. The score is a sum of log terms
    (so no single feature dominates):

    - ``log1p(words in the prompt)``: longer specifications ask for more;
    - ``2 * log1p(non-blank lines of the reference solution)``: the strongest
      signal when a reference exists;
    - ``0.5 * log1p(control-flow keywords in the reference)``: branching;
    - ``0.5 * log1p(test assertions)``: more checks, more to get right.

    Args:
        prompt: the task prompt.
        reference: a reference solution, if any.
        tests: the task's test code, if any.

    Returns:
        A non-negative float.
    """
    score = math.log1p(len(prompt.split()))
    if reference:
        lines = [line for line in reference.splitlines() if line.strip()]
        score += 2.0 * math.log1p(len(lines))
        score += 0.5 * math.log1p(len(_BRANCH_WORDS.findall(reference)))
    if tests:
        score += 0.5 * math.log1p(len(_TEST_MARKERS.findall(tests)))
    return float(score)


def _fill_missing(difficulties: Sequence[float | int | None], estimates: Sequence[float] | None) -> np.ndarray:
    """Replace missing difficulties by estimates mapped onto the labelled scale.

    When some tasks are labelled, an estimate is converted by quantile
    matching: its rank among all estimates picks the same quantile of the
    labelled difficulties. Labels and estimates then share one scale.
    """
    missing = np.array([d is None for d in difficulties], dtype=bool)
    if not missing.any():
        return np.asarray(difficulties, dtype=np.float64)
    if estimates is None or len(estimates) != len(difficulties):
        raise ValueError(
            f"{int(missing.sum())} task(s) have no difficulty: pass `estimates` (one per task, "
            "e.g. from estimate_difficulty) or label every task."
        )
    est = np.asarray(estimates, dtype=np.float64)
    if missing.all():
        return est
    known = np.array([float(d) for d in difficulties if d is not None])
    ranks = np.argsort(np.argsort(est, kind="stable"), kind="stable")
    quantile = ranks / max(len(est) - 1, 1)
    out = np.array([0.0 if d is None else float(d) for d in difficulties])
    out[missing] = np.quantile(known, quantile[missing])
    return out


def _buckets(difficulty: np.ndarray, num_buckets: int) -> list[np.ndarray]:
    """Split task indices into quantile buckets; equal difficulties stay together.

    A task goes into bucket ``#edges strictly below its difficulty``; empty
    buckets (from ties) are dropped, so there may be fewer than asked.
    """
    edges = np.quantile(difficulty, np.arange(1, num_buckets) / num_buckets) if num_buckets > 1 else np.array([])
    which = np.searchsorted(edges, difficulty, side="left")
    groups = [np.flatnonzero(which == b) for b in range(num_buckets)]
    return [g for g in groups if len(g) > 0]


class _EpochSampler:
    """Shuffled epochs over a fixed pool of task indices; state is plain lists."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator) -> None:
        self.pool = np.asarray(pool, dtype=np.int64)
        self.order = rng.permutation(self.pool)
        self.cursor = 0
        self.epoch = 0

    def take(self, n: int, rng: np.random.Generator) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            k = min(n - len(out), len(self.order) - self.cursor)
            out.extend(int(i) for i in self.order[self.cursor : self.cursor + k])
            self.cursor += k
            if self.cursor >= len(self.order):
                # Reshuffle as soon as a pass ends, so `epoch` counts finished passes.
                self.order = rng.permutation(self.pool)
                self.cursor = 0
                self.epoch += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.tolist(), "order": self.order.tolist(), "cursor": self.cursor, "epoch": self.epoch}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _EpochSampler:
        self = cls.__new__(cls)
        self.pool = np.asarray(state["pool"], dtype=np.int64)
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])
        return self


def curriculum_from_config(config: CurriculumConfig, tasks: Sequence[Task], *, seed: int) -> Curriculum:
    """The run's curriculum over ``tasks``, as the config's ``curriculum`` section describes it.

    Tasks without a ``difficulty`` are placed by ``estimate_difficulty``.
    """
    return Curriculum(
        [t.id for t in tasks],
        [t.difficulty for t in tasks],
        estimates=[estimate_difficulty(t.prompt, t.reference, t.tests) for t in tasks],
        enabled=config.enabled,
        num_buckets=config.num_buckets,
        advance_threshold=config.advance_threshold,
        advance_after_steps=config.advance_after_steps,
        window=config.window,
        mix_previous=config.mix_previous,
        seed=seed,
    )


class Curriculum:
    """Difficulty-bucketed (or plain shuffled) batches of task ids, resumable exactly.

    Progression is checked at the start of ``next_batch``; each
    ``next_batch`` call counts as one step in the current bucket. Rewards
    ``record``-ed for tasks outside the current bucket (rehearsal draws) do
    not count toward its window. A bucket smaller than the batch wraps into
    its next epoch, so a batch can repeat an id.
    """

    def __init__(
        self,
        task_ids: Sequence[str],
        difficulties: Sequence[float | int | None] | None = None,
        *,
        enabled: bool = True,
        estimates: Sequence[float] | None = None,
        num_buckets: int = 3,
        advance_threshold: float | None = None,
        advance_after_steps: int | None = None,
        window: int = 32,
        mix_previous: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Build the buckets and the first shuffles.

        Args:
            task_ids: unique ids of all tasks.
            difficulties: one per task (float/int, or None = unknown); unused
                when ``enabled=False``. None for all means all unknown.
            enabled: False gives plain shuffled epochs over all tasks.
            estimates: one per task (e.g. ``estimate_difficulty``), used for
                tasks whose difficulty is None (see ``_fill_missing``).
            num_buckets: how many difficulty quantiles (fewer when ties leave
                a bucket empty).
            advance_threshold: move on when the mean of the last ``window``
                recorded rewards on the current bucket is >= this.
            advance_after_steps: move on after this many batches in a bucket;
                None: after ``DEFAULT_PASSES`` passes over the bucket's tasks.
            window: how many recent rewards the threshold averages; the
                threshold is only tested once the window is full.
            mix_previous: fraction of each batch drawn from easier buckets
                (rounded, and at most all but one of the batch).
            seed: seeds the one Generator every shuffle comes from.
        """
        self._task_ids = [str(t) for t in task_ids]
        if not self._task_ids:
            raise ValueError("The curriculum needs at least one task.")
        if len(set(self._task_ids)) != len(self._task_ids):
            raise ValueError("Task ids must be unique.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        if not 0.0 <= mix_previous < 1.0:
            raise ValueError(f"mix_previous must be in [0, 1), got {mix_previous}.")
        self._index = {t: i for i, t in enumerate(self._task_ids)}
        self.enabled = enabled
        self.advance_threshold = advance_threshold
        self.advance_after_steps = advance_after_steps
        self.window = window
        self.mix_previous = mix_previous
        self._rng = np.random.default_rng(seed)

        if enabled:
            if difficulties is None:
                difficulties = [None] * len(self._task_ids)
            if len(difficulties) != len(self._task_ids):
                raise ValueError(f"Got {len(difficulties)} difficulties for {len(self._task_ids)} tasks.")
            self._bucket_members = _buckets(_fill_missing(difficulties, estimates), max(1, num_buckets))
        else:
            self._bucket_members = [np.arange(len(self._task_ids))]
        self._bucket_of = np.empty(len(self._task_ids), dtype=np.int64)
        for b, members in enumerate(self._bucket_members):
            self._bucket_of[members] = b

        self._bucket = 0
        self._steps_in_bucket = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._main = _EpochSampler(self._bucket_members[0], self._rng)
        self._review: _EpochSampler | None = None

    # -- reading --------------------------------------------------------------

    @property
    def bucket(self) -> int:
        """Index of the current bucket (0 = easiest); always 0 when disabled."""
        return self._bucket

    @property
    def num_buckets(self) -> int:
        """Number of non-empty buckets."""
        return len(self._bucket_members)

    @property
    def epoch(self) -> int:
        """Completed passes over the current bucket (over all tasks when disabled)."""
        return self._main.epoch

    @property
    def cursor(self) -> int:
        """Position within the current epoch's shuffled order."""
        return self._main.cursor

    def bucket_task_ids(self, bucket: int) -> list[str]:
        """Task ids in ``bucket``, in the task list's order."""
        return [self._task_ids[i] for i in self._bucket_members[bucket]]

    def stats(self) -> dict[str, Any]:
        """Numbers for the dashboard and the metrics log."""
        return {
            "enabled": self.enabled,
            "bucket": self._bucket,
            "num_buckets": self.num_buckets,
            "bucket_size": int(len(self._bucket_members[self._bucket])),
            "steps_in_bucket": self._steps_in_bucket,
            "window_mean": float(np.mean(self._recent)) if self._recent else float("nan"),
            "window_count": len(self._recent),
            "epoch": self.epoch,
            "cursor": self.cursor,
        }

    # -- stepping -------------------------------------------------------------

    def next_batch(self, batch_size: int) -> list[str]:
        """Task ids for the next step (advancing first if the bucket is done).

        Args:
            batch_size: how many task ids.

        Returns:
            ``batch_size`` ids: current-bucket draws, then rehearsal draws.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if self.enabled and self._should_advance():
            self._advance()
        # At least one draw from the current bucket, however small the batch or large the mix.
        n_review = min(int(round(self.mix_previous * batch_size)), batch_size - 1) if self._review is not None else 0
        picked = self._main.take(batch_size - n_review, self._rng)
        if n_review:
            assert self._review is not None
            picked += self._review.take(n_review, self._rng)
        self._steps_in_bucket += 1
        return [self._task_ids[i] for i in picked]

    def record(self, task_id: str, reward_mean: float) -> None:
        """Report a task's mean reward for this step (NaN = unscored, ignored).

        Args:
            task_id: a task id given at construction.
            reward_mean: mean reward of the task's samples this step.
        """
        if task_id not in self._index:
            raise ValueError(f"Unknown task id {task_id!r}.")
        reward_mean = float(reward_mean)
        if math.isnan(reward_mean):
            return
        if self._bucket_of[self._index[task_id]] == self._bucket:
            self._recent.append(reward_mean)

    def _should_advance(self) -> bool:
        if self._bucket + 1 >= self.num_buckets:
            return False
        if self.advance_after_steps is not None:
            if self._steps_in_bucket >= self.advance_after_steps:
                return True
        elif self._main.epoch >= DEFAULT_PASSES:
            return True
        return (
            self.advance_threshold is not None
            and len(self._recent) >= self.window
            and float(np.mean(self._recent)) >= self.advance_threshold
        )

    def _advance(self) -> None:
        self._bucket += 1
        self._steps_in_bucket = 0
        self._recent.clear()
        self._main = _EpochSampler(self._bucket_members[self._bucket], self._rng)
        easier = np.concatenate(self._bucket_members[: self._bucket])
        self._review = _EpochSampler(easier, self._rng) if self.mix_previous > 0 else None

    # -- checkpointing --------------------------------------------------------

    def _fingerprint(self) -> str:
        payload = "\n".join(self._task_ids) + "|" + ";".join(",".join(map(str, m)) for m in self._bucket_members)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (plain ints, floats, lists, str)."""
        return {
            "fingerprint": self._fingerprint(),
            "enabled": self.enabled,
            "bucket": self._bucket,
            "steps_in_bucket": self._steps_in_bucket,
            "recent": list(self._recent),
            "main": self._main.state_dict(),
            "review": None if self._review is None else self._review.state_dict(),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; the task list must be the same.

        Raises:
            ValueError: when the tasks or buckets differ from the saved run.
        """
        if state["fingerprint"] != self._fingerprint() or bool(state["enabled"]) != self.enabled:
            raise ValueError(
                "The checkpoint's curriculum was built from a different task list, difficulty "
                "buckets or curriculum setting; resume with the same data and config."
            )
        self._bucket = int(state["bucket"])
        self._steps_in_bucket = int(state["steps_in_bucket"])
        self._recent = deque((float(x) for x in state["recent"]), maxlen=self.window)
        self._main = _EpochSampler.from_state(state["main"])
        self._review = None if state["review"] is None else _EpochSampler.from_state(state["review"])
        self._rng.bit_generator.state = state["rng"]
