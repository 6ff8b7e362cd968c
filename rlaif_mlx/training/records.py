"""A step's records: the rollout (samples with everything attached) and what is logged of it.

``Rollout`` travels through the step (its policy log-probs are those recorded
while sampling, laid out by ``sampled_logprobs``); ``step_record`` turns it, the update's
statistics and the timings into the flat metrics record that ``metrics.jsonl``,
TensorBoard and the reporters show; ``extreme_samples`` picks the best and worst
scored completions for display.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Completion, SequenceBatch, StepStats
from ..data.tasks import Task
from ..monitor.reporting import SampleView
from ..rewards.pipeline import RewardResult


@dataclass
class Rollout:
    """One step's samples with everything attached to them, in prompt-major order.

    Attributes:
        tasks: ``[B]`` the prompts' tasks.
        completions: ``[B*G]`` sampled completions.
        results: uid -> reward result (looked up by uid, never by position).
        rewards: ``[B, G]`` scalar reward, NaN where a sample could not be scored.
        sequences: the ``[B*G, T]`` token batch.
        policy_logp / ref_logp: ``[B*G, T-1]``.
    """

    tasks: list[Task]
    completions: list[Completion]
    results: dict[str, RewardResult]
    rewards: np.ndarray
    sequences: SequenceBatch
    policy_logp: np.ndarray
    ref_logp: np.ndarray | None


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
    errors = suspect = 0
    for res in rollout.results.values():
        errors += res.error is not None and res.reward is None
        suspect += bool(res.suspect)
        for name, value in res.components.items():
            components.setdefault(name, []).append(value)
    sample_s, score_s, reference_s, train_s, total_s = times
    return {
        "step": step,
        "epoch": epoch,
        "reward_mean": float(rewards.mean()) if rewards.size else float("nan"),
        "reward_std": float(rewards.std()) if rewards.size else float("nan"),
        **{f"reward/{k}": float(np.mean(v)) for k, v in sorted(components.items())},
        # the share of samples whose code reaches for the grading surface (shown, never scored)
        "reward/suspect": suspect / max(len(rollout.results), 1),
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


def sampled_logprobs(completions: list[Completion], sequences: SequenceBatch) -> np.ndarray:
    """The log-probs recorded while sampling, laid out as ``[N, T-1]`` like ``Backend.logprobs``."""
    out = np.zeros(sequences.loss_mask.shape, dtype=np.float32)
    for i, c in enumerate(completions):
        start = len(c.prompt_ids) - 1
        out[i, start : start + len(c.logprobs)] = c.logprobs
    return out


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
