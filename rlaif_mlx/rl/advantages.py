"""Advantages from group rewards: baselines, std scaling, whitening, EMA baseline, KL in the reward.

Rewards arrive as a ``[B, G]`` array: B prompts, G sampled completions each.
A NaN reward means the completion could not be scored (teacher failure,
sandbox crash ...). Such a sample is *excluded*: its advantage is 0 (so it
contributes no gradient) and it is not counted in its group's mean or std.

Every statistic (group mean and std, the zero-variance mask, the EMA's batch
mean) is taken over the TASK rewards. A KL penalty placed in the reward
(``kl_penalty``, ``beta * sum_t k1`` per sample) joins after all normalisation,
centred on its group: a group whose samples all scored the same keeps a task
advantage of exactly 0, and KL noise is never divided by a reward spread.

Pure numpy; no framework imports (see DESIGN.md, "dependency arrows").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Baseline = Literal["group_mean", "leave_one_out", "ema", "none"]
BASELINES: tuple[str, ...] = ("group_mean", "leave_one_out", "ema", "none")


@dataclass
class EmaBaseline:
    """Exponential moving average of the batch mean reward, used as a baseline.

    ``compute_advantages`` only *reads* ``value``; after the step the caller
    folds the batch in with ``update(result.mean_reward)`` so the function
    itself stays pure.

    Attributes:
        decay: weight of the old value, in [0, 1).
        value: current average, or None before the first update.
    """

    decay: float = 0.9
    value: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {self.decay}.")

    def update(self, mean_reward: float) -> float | None:
        """Fold one batch's mean reward into the average.

        Args:
            mean_reward: mean of the valid rewards of the batch. NaN (a batch
                where nothing could be scored) leaves the average unchanged.

        Returns:
            The new value (None if still never updated).
        """
        mean_reward = float(mean_reward)
        if np.isnan(mean_reward):
            return self.value
        if self.value is None:
            # The first batch seeds the average instead of being pulled toward 0.
            self.value = mean_reward
        else:
            self.value = self.decay * self.value + (1.0 - self.decay) * mean_reward
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Plain floats, safe to write into a JSON checkpoint."""
        return {"decay": float(self.decay), "value": None if self.value is None else float(self.value)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.decay = float(state["decay"])
        value = state.get("value")
        self.value = None if value is None else float(value)


@dataclass(frozen=True)
class AdvantageResult:
    """Advantages of one batch and the bookkeeping that came with them.

    Attributes:
        advantages: ``[B, G]`` float64; 0 wherever ``train_mask`` is False.
        valid_mask: ``[B, G]`` bool; True where the reward was scored.
        train_mask: ``[B, G]`` bool; the samples that train: scored, and not in
            a zero-variance group when those are skipped.
        zero_variance_mask: ``[B]`` bool; True for groups whose task rewards
            carry no within-group signal (fewer than two valid rewards, or all
            valid rewards equal).
        zero_variance_groups: number of True entries of ``zero_variance_mask``.
        group_mean: ``[B]`` mean of each group's valid task rewards (NaN if none).
        group_std: ``[B]`` population std (ddof=0) of each group's valid task
            rewards (NaN if none).
        mean_reward: mean of all valid task rewards of the batch (NaN if none);
            feed it to ``EmaBaseline.update``.
    """

    advantages: np.ndarray
    valid_mask: np.ndarray
    train_mask: np.ndarray
    zero_variance_mask: np.ndarray
    zero_variance_groups: int
    group_mean: np.ndarray
    group_std: np.ndarray
    mean_reward: float


def compute_advantages(
    rewards: np.ndarray,
    *,
    baseline: Baseline = "group_mean",
    scale_by_std: bool = False,
    whiten: bool = False,
    skip_zero_variance: bool = False,
    kl_penalty: np.ndarray | None = None,
    eps: float = 1e-6,
    ema_state: EmaBaseline | None = None,
) -> AdvantageResult:
    """Turn per-sample task rewards (and an optional KL penalty) into per-sample advantages.

    Steps, in order, all on the task rewards: subtract the baseline; optionally
    divide by the group std; optionally whiten over the samples that train.
    Then the KL penalty, if any, joins: ``A -= kl_penalty - mean of kl_penalty
    over the group's training samples``. Samples that do not train (unscored,
    or in a skipped zero-variance group) get advantage 0 and are left out of the
    whitening statistics and the KL centring.

    Args:
        rewards: ``[B, G]`` float task rewards; NaN = could not be scored.
        baseline: ``"group_mean"`` (mean of the group's valid rewards),
            ``"leave_one_out"`` (mean of the *other* valid rewards of the
            group; a sample alone in its group gets advantage 0), ``"ema"``
            (``ema_state.value``; the batch mean before the first update),
            or ``"none"`` (raw rewards).
        scale_by_std: divide by ``group_std + eps``, where ``group_std`` is the
            population std (ddof=0) over the group's valid rewards; zero-variance
            groups are left unscaled.
        whiten: after the above, ``(a - mean) / (std + eps)`` with mean and
            population std (ddof=0) over the advantages of the samples that
            train (never the zeros of unscored or skipped samples).
        skip_zero_variance: zero-variance groups do not train (``train_mask``).
        kl_penalty: ``[B, G]`` per-sample penalty in reward units (``beta *
            sum_t k1``, the ``kl_placement: reward`` option), or None. Centred on
            its group and never scaled, it moves a sample's advantage by the
            sample's KL relative to its siblings' (``kl.kl_reward_penalty``).
        eps: added to every std before dividing.
        ema_state: required when ``baseline == "ema"``; read, not modified.

    Returns:
        An ``AdvantageResult``.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [B, G] (prompts x samples), got shape {rewards.shape}.")
    if baseline not in BASELINES:
        raise ValueError(f"Unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}.")
    if baseline == "ema" and ema_state is None:
        raise ValueError("baseline='ema' needs an EmaBaseline passed as ema_state.")
    if kl_penalty is not None and np.shape(kl_penalty) != rewards.shape:
        raise ValueError(f"kl_penalty must have the rewards' shape {rewards.shape}, got {np.shape(kl_penalty)}.")

    valid = ~np.isnan(rewards)
    r = np.where(valid, rewards, 0.0)  # zeros keep NaN out of the sums below
    count = valid.sum(axis=1)  # [B]
    total = r.sum(axis=1)  # [B]
    safe_count = np.maximum(count, 1)
    group_mean = np.where(count > 0, total / safe_count, np.nan)
    centred = np.where(valid, r - np.nan_to_num(group_mean)[:, None], 0.0)
    group_std = np.where(count > 0, np.sqrt((centred**2).sum(axis=1) / safe_count), np.nan)

    # Exact equality on purpose: rewards of equal outcomes are computed the same way.
    r_max = np.where(valid, r, -np.inf).max(axis=1)
    r_min = np.where(valid, r, np.inf).min(axis=1)
    zero_variance = (count < 2) | (r_max == r_min)
    train = valid & ~zero_variance[:, None] if skip_zero_variance else valid

    mean_reward = float(r.sum() / valid.sum()) if valid.any() else float("nan")

    if baseline == "group_mean":
        adv = r - np.nan_to_num(group_mean)[:, None]
    elif baseline == "leave_one_out":
        others = (count[:, None] - 1).astype(np.float64)  # [B, 1] -> [B, G]
        loo_mean = (total[:, None] - r) / np.maximum(others, 1.0)
        adv = np.where(others > 0, r - loo_mean, 0.0)
    elif baseline == "ema":
        assert ema_state is not None
        value = ema_state.value if ema_state.value is not None else mean_reward
        adv = r - (0.0 if np.isnan(value) else value)
    else:  # "none"
        adv = r.copy()

    if scale_by_std:
        # A zero-variance group has no spread to normalise by; dividing by eps
        # would turn an un-centred (EMA) advantage into ~1e6.
        scale = np.where(zero_variance, 1.0, np.nan_to_num(group_std) + eps)
        adv = adv / scale[:, None]

    adv = np.where(train, adv, 0.0)

    if whiten and train.any():
        vals = adv[train]
        adv = np.where(train, (adv - vals.mean()) / (vals.std() + eps), 0.0)

    if kl_penalty is not None:
        pen = np.where(train, np.asarray(kl_penalty, dtype=np.float64), 0.0)
        n_train = train.sum(axis=1, keepdims=True)
        pen_mean = pen.sum(axis=1, keepdims=True) / np.maximum(n_train, 1)
        adv = np.where(train, adv - (pen - pen_mean), 0.0)

    return AdvantageResult(
        advantages=adv,
        valid_mask=valid,
        train_mask=train,
        zero_variance_mask=zero_variance,
        zero_variance_groups=int(zero_variance.sum()),
        group_mean=group_mean,
        group_std=group_std,
        mean_reward=mean_reward,
    )


def apply_zero_variance_skip(result: AdvantageResult) -> np.ndarray:
    """Sample weights that drop zero-variance groups, whatever ``skip_zero_variance`` was.

    Args:
        result: what ``compute_advantages`` returned.

    Returns:
        ``[B, G]`` float64: 1.0 for valid samples of groups with signal, else 0.0.
    """
    keep = result.valid_mask & ~result.zero_variance_mask[:, None]
    return keep.astype(np.float64)
