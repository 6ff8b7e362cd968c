"""What a run shows a person while it trains: the reporter seam and the plain one-line log.

The trainer hands each step's metrics record, and the step's best and worst
scored completions, to a ``Reporter``. ``PlainReporter`` prints one line per
step (CI, ``nohup``, pipes, ``--no-dashboard``); ``dashboard.Dashboard`` is the
live ``rich`` view on a terminal. Both see the same data, so neither knows
more than ``metrics.jsonl`` does, plus the two sample texts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SampleView:
    """One scored completion, for display.

    Attributes:
        task_id: the task it answers.
        prompt: the task's prompt.
        text: the completion.
        language: the task's language (for syntax highlighting).
        reward: its reward (None when it could not be scored).
        components: each reward component.
        error: why it could not be scored, or the first failure, when there is one.
    """

    task_id: str
    prompt: str
    text: str
    language: str
    reward: float | None
    components: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class RunHeader:
    """What stays fixed for the whole run (the dashboard's title block)."""

    model: str
    backend: str
    device: str
    total_steps: int
    output_dir: str
    teacher: str | None = None  # "anthropic/claude-sonnet-5-5", or None without a teacher
    budget_usd: float | None = None
    start_step: int = 0  # > 0 for a resumed run (the ETA counts from here)


class Reporter(Protocol):
    """Receives a run's progress. Implementations: ``PlainReporter``, ``dashboard.Dashboard``."""

    def start(self, header: RunHeader) -> None: ...

    def step(self, record: dict[str, Any], *, best: SampleView | None, worst: SampleView | None) -> None:
        """One optimizer step's metrics record (the ``metrics.jsonl`` line) and its extreme samples."""
        ...

    def message(self, text: str) -> None:
        """A line worth showing (evaluation results, a checkpoint, a stop)."""
        ...

    def warmup(self, done: int, total: int, nll: float | None) -> None:
        """The supervised warm-up's progress: steps done of ``total``; the NLL per token when measured."""
        ...

    def close(self) -> None: ...


class PlainReporter:
    """One plain line per step (every ``log_every`` steps) and every message, through ``write``."""

    def __init__(self, write: Callable[[str], None] = print, *, log_every: int = 1) -> None:
        self.write = write
        self.log_every = log_every
        self.total_steps = 0

    def start(self, header: RunHeader) -> None:
        self.total_steps = header.total_steps

    def step(self, record: dict[str, Any], *, best: SampleView | None, worst: SampleView | None) -> None:
        if record["step"] % self.log_every == 0 or record["step"] == self.total_steps:
            self.write(format_step_line(record, self.total_steps))

    def message(self, text: str) -> None:
        self.write(text)

    def warmup(self, done: int, total: int, nll: float | None) -> None:
        if nll is not None:  # every 10 steps and the last
            self.write(format_warmup_line(done, total, nll))

    def close(self) -> None:
        pass


def format_warmup_line(done: int, total: int, nll: float) -> str:
    """The warm-up's line: ``warm-up 10/110  nll/token 4.187``."""
    return f"warm-up {done}/{total}  nll/token {nll:.3f}"


def format_step_line(record: dict[str, Any], total_steps: int) -> str:
    """The plain one-line-per-step log."""
    line = (
        f"step {record['step']:>4}/{total_steps}  reward {record['reward_mean']:.3f}±{record['reward_std']:.3f}  "
        f"kl {record['kl']:.4f} (β {record['kl_coef']:.3g})  loss {record['loss']:+.4f}  "
        f"|g| {record['grad_norm']:.3f}  lr {record['lr']:.2e}  len {record['completion_len_mean']:.0f}  "
        f"{record['step_seconds']:.1f}s"
    )
    if "teacher/calls" in record:
        line += f"  teacher {record['teacher/calls']:.0f} calls ${record['teacher/spent_usd']:.2f}"
    return line
