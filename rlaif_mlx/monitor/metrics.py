"""Metric sinks: what a run leaves behind to look at, one record per optimizer step.

``metrics.jsonl`` always (one JSON object per step); TensorBoard event files
when enabled; and ``samples.jsonl``, every completion of every step with its
scores, for reading what the model actually wrote.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.base import Completion
    from ..data.tasks import Task
    from ..rewards.pipeline import RewardResult


class JsonlSink:
    """Appends one JSON object per call; flushed each time so a crash loses nothing."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None) -> None:
        """Opens ``path`` for appending.

        Args:
            path: the ``metrics.jsonl`` file.
            truncate_after_step: for a resumed run, first drop the records of steps after
                the restored one; None (a fresh run) keeps everything and appends.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None:
            _truncate_after(self.path, truncate_after_step)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(_json_line(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Writes each record's numbers as TensorBoard scalars, with ``tensorboardX``.

    tensorboardX needs neither TensorFlow nor torch, so MLX-only installs have it.
    Keys keep their slashes, so ``reward/tests`` and ``teacher/calls`` show up
    grouped under ``reward`` and ``teacher``.

    Args:
        log_dir: the folder of the event files (``<output_dir>/tensorboard``).
        purge_step: for a resumed run, the first step it will write: TensorBoard
            then hides the events an earlier run wrote from that step on, so the
            curves do not double back. None keeps everything.
    """

    def __init__(self, log_dir: Path, *, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter  # imported here: it pulls in torch when torch is installed

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(
            str(self.log_dir),
            purge_step=purge_step,
            # Steps are seconds apart: flush often so a live TensorBoard and a crash lose little.
            flush_secs=5,
            # The default name has whole seconds only; a resume within the same
            # second (as in tests) would overwrite the earlier file. Nanoseconds also
            # keep TensorBoard's file order, which its purge on resume relies on.
            filename_suffix=f".{time.time_ns()}",
        )

    def write(self, record: Mapping[str, Any]) -> None:
        """Adds every numeric value of ``record`` at ``global_step=record["step"]``.

        Strings and other non-numbers are skipped; so are infinities, which would
        wreck a chart's scale. NaN (nothing measurable this step) is kept.
        """
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            value = float(value)
            if not math.isinf(value):
                self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class SampleSink:
    """Appends every completion of a step, with its scores, to a JSONL file.

    Args:
        path: the ``samples.jsonl`` file.
        truncate_after_step: for a resumed run, first drop the lines of steps after the
            restored one, as ``JsonlSink`` does; None keeps everything and appends.
    """

    def __init__(self, path: Path, *, truncate_after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None:
            _truncate_after(self.path, truncate_after_step)
        self._file = self.path.open("a", encoding="utf-8")

    def write_step(self, step: int, rows: Iterable[Mapping[str, Any]]) -> None:
        """Writes one line per row, each led by ``step``; flushed once per step."""
        for row in rows:
            self._file.write(_json_line({"step": step, **row}))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def sample_rows(
    tasks: list[Task], completions: list[Completion], results: Mapping[str, RewardResult]
) -> list[dict[str, Any]]:
    """One row per completion for ``SampleSink``: the task, the text and its scores.

    Args:
        tasks: ``[B]`` the step's tasks (``completion.prompt_index`` points here).
        completions: ``[B*G]`` the step's completions.
        results: uid -> reward result; matched by uid, never by position.

    Returns:
        ``task_id``, ``uid``, ``prompt``, ``completion``, ``finish_reason``,
        ``num_tokens``, ``reward`` (None when unscored), one key per reward
        component (as ``rlaif-mlx score`` writes them), ``error``, ``grade`` (the
        grade's kind: passed, failed, timed_out ...) and ``suspect`` (how the code
        reaches for the grading surface; empty for plain code).
    """
    rows = []
    for c in completions:
        task, result = tasks[c.prompt_index], results[c.uid]
        rows.append(
            {
                "task_id": task.id,
                "uid": c.uid,
                "prompt": task.prompt,
                "completion": c.text,
                "finish_reason": c.finish_reason,
                "num_tokens": len(c.completion_ids),
                "reward": result.reward,
                **result.components,
                "error": result.error,
                "grade": result.kind,
                "suspect": list(result.suspect),
            }
        )
    return rows


class MetricsSinks:
    """``metrics.jsonl`` plus the optional TensorBoard and sample sinks, written and closed together.

    Args:
        jsonl: the ``metrics.jsonl`` sink.
        tensorboard: the TensorBoard sink, or None when disabled.
        samples: the ``samples.jsonl`` sink, or None when disabled.
    """

    def __init__(
        self, jsonl: JsonlSink, *, tensorboard: TensorBoardSink | None = None, samples: SampleSink | None = None
    ) -> None:
        self.jsonl = jsonl
        self.tensorboard = tensorboard
        self.samples = samples

    @classmethod
    def open(cls, output_dir: Path, *, after_step: int | None, tensorboard: bool, samples: bool) -> MetricsSinks:
        """A run's sinks in ``output_dir``, appending; a resumed run's first dropping steps after ``after_step``.

        Args:
            output_dir: the run's folder.
            after_step: the restored step of a resumed run; None for a fresh run, which never drops anything.
            tensorboard: also write TensorBoard event files (``logging.tensorboard``).
            samples: also write ``samples.jsonl`` (``logging.save_samples``).
        """
        out = Path(output_dir)
        return cls(
            JsonlSink(out / "metrics.jsonl", truncate_after_step=after_step),
            # Purge from the first step this run writes, as metrics.jsonl is truncated: TensorBoard
            # then hides what an earlier run in this folder wrote from that step on.
            tensorboard=TensorBoardSink(
                out / "tensorboard", purge_step=after_step + 1 if after_step is not None else None
            )
            if tensorboard
            else None,
            samples=SampleSink(out / "samples.jsonl", truncate_after_step=after_step) if samples else None,
        )

    def write(self, record: dict[str, Any]) -> None:
        """Writes one step's record to ``metrics.jsonl`` and, when enabled, TensorBoard."""
        self.jsonl.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def write_samples(
        self, step: int, tasks: list[Task], completions: list[Completion], results: Mapping[str, RewardResult]
    ) -> None:
        """Writes the step's completions when samples are saved (see ``sample_rows``); else nothing."""
        if self.samples is not None:
            self.samples.write_step(step, sample_rows(tasks, completions, results))

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # closes every sink even when one of them fails
            for sink in (self.jsonl, self.tensorboard, self.samples):
                if sink is not None:
                    stack.callback(sink.close)


def _truncate_after(path: Path, step: int) -> None:
    """Drops the lines of steps after ``step`` from a JSONL file, if it exists.

    On resume, the lines written after the checkpoint we resume from go (and a
    line torn by a crash mid-write, which has no step to keep). The file is
    replaced whole, so a crash while cutting leaves the old file, never half of it.
    """
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


def _step_of(line: str) -> float:
    """A record's step (0 for a record without one); infinity for a blank or unreadable line."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    return record.get("step", 0) if isinstance(record, dict) else math.inf


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in record.items()}) + "\n"


def _plain(value: Any) -> Any:
    """JSON has no NaN: unmeasurable values become null rather than a fake number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` back (for tests, plots and resume)."""
    return _read_jsonl(path)


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Reads a ``samples.jsonl`` back: one dict per completion, in the order written."""
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
