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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # the trainer imports this module
    from ..backends.base import StepStats
    from ..training.trainer import Rollout


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
        """A line worth showing (warm-up progress, evaluation results, a checkpoint)."""
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

    def close(self) -> None:
        pass


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


def step_record(
    rollout: Rollout,
    stats: StepStats,
    adv_stats: dict[str, float],
    *,
    step: int,
    epoch: int,
    bucket: int,
    kl_token: float,
    kl_coef: float,
    times: tuple[float, ...],
    ahead: dict[str, Any] | None = None,
    teacher: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One RL step's metrics record (a ``metrics.jsonl`` line; the README lists every key).

    Args:
        rollout: the step's whole batch: completions, their results and rewards (NaN = unscored).
        stats: the optimizer step's loss, its parts and the gradient norm.
        adv_stats: what the advantage computation reports (mean |advantage|, zero-variance groups, ...).
        times: seconds spent sampling, scoring, on reference log-probs, training, and the whole step.
        ahead: the sampling-ahead keys (``sample_ahead_seconds``, ``sampled_ahead``), if on.
        teacher: the ``teacher/*`` keys, when a teacher scores.
    """
    rewards = rollout.rewards[np.isfinite(rollout.rewards)]
    lengths = [len(c.completion_ids) for c in rollout.completions]
    components: dict[str, list[float]] = {}
    errors = 0
    for res in rollout.results.values():
        errors += res.error is not None and res.reward is None
        for name, value in res.components.items():
            components.setdefault(name, []).append(value)
    sample_s, score_s, reference_s, train_s, total_s = times
    return {
        "step": step,
        "epoch": epoch,
        "reward_mean": float(rewards.mean()) if rewards.size else float("nan"),
        "reward_std": float(rewards.std()) if rewards.size else float("nan"),
        **{f"reward/{k}": float(np.mean(v)) for k, v in sorted(components.items())},
        "kl": float(kl_token),
        "kl_coef": float(kl_coef),
        "loss": stats.loss,
        "pg_loss": stats.pg_loss,
        "grad_norm": stats.grad_norm,
        "lr": stats.lr,
        "clip_fraction": stats.clip_fraction,
        "completion_len_mean": float(np.mean(lengths)),
        "scoring_errors": int(errors),
        **adv_stats,
        "update_skipped": int(stats.extra.get("update_skipped", 0)),
        "curriculum_bucket": bucket,
        "sample_seconds": sample_s,
        "score_seconds": score_s,
        "reference_seconds": reference_s,  # overlapped with scoring
        "train_seconds": train_s,
        "step_seconds": total_s,
        **(ahead or {}),
        "tokens_per_second": float(sum(lengths) / max(sample_s, 1e-9)),
        **(teacher or {}),
    }


def extreme_samples(rollout: Rollout) -> tuple[SampleView | None, SampleView | None]:
    """The step's best and worst scored completions (None when nothing was scored)."""
    scored = [(r, i) for i, r in enumerate(rollout.rewards.reshape(-1)) if np.isfinite(r)]
    if not scored:
        return None, None

    def view(index: int) -> SampleView:
        c = rollout.completions[index]
        task, result = rollout.tasks[c.prompt_index], rollout.results[c.uid]
        return SampleView(
            task.id, task.prompt, c.text, task.language, result.reward, dict(result.components), result.error
        )

    return view(max(scored)[1]), view(min(scored)[1])
