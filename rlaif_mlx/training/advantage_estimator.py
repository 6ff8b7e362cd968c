"""From a step's rollout to what the loss needs: advantages, token weights and the KL coefficient.

The math is in ``rl/`` (``advantages``, ``kl``, ``objective``); this is the
bookkeeping a run keeps between steps: the KL controller (fixed or adaptive),
whose coefficient penalises either the rewards or the loss, and the EMA
baseline. Both are part of a checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import RlaifConfig, TrainingConfig
from ..rl import advantages as adv
from ..rl import kl as klmod
from ..rl.objective import aggregation_weights
from .records import Rollout


class AdvantageEstimator:
    """Advantages and token weights for each step, and the KL coefficient between steps.

    Args:
        rlaif: the config's ``rlaif`` section (baseline, scaling, KL control).
        training: the config's ``training`` section (the loss's token aggregation).

    Attributes:
        kl_controller: ``FixedKLController`` or ``AdaptiveKLController``.
        ema: the EMA baseline when ``rlaif.baseline`` is ``ema``, else None.
    """

    def __init__(self, rlaif: RlaifConfig, training: TrainingConfig) -> None:
        self.rlaif = rlaif
        self.aggregation = training.loss_aggregation
        if rlaif.adaptive_kl:
            self.kl_controller = klmod.AdaptiveKLController(
                rlaif.kl_penalty, rlaif.target_kl, kl_horizon_steps(rlaif, training)
            )
        else:
            self.kl_controller = klmod.FixedKLController(rlaif.kl_penalty)
        self.ema = adv.EmaBaseline(decay=rlaif.ema_decay) if rlaif.baseline == "ema" else None

    @property
    def kl_coef(self) -> float:
        """The KL coefficient for this step."""
        return self.kl_controller.value

    @property
    def needs_reference(self) -> bool:
        """Whether the step needs the reference model's log-probs (a KL term now, or one to adapt)."""
        return self.kl_controller.value > 0 or self.rlaif.adaptive_kl

    def advantages(self, rollout: Rollout) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Per-sample advantages ``[B*G]``, the loss's token weights ``[B*G, T-1]`` and their statistics.

        Unscored samples (NaN rewards) get advantage 0 and no token weight, as do
        zero-variance groups when ``rlaif.skip_zero_variance_groups`` is on. With
        ``kl_placement: reward`` the statistics are the task rewards' and the KL
        penalty joins afterwards (``advantages.compute_advantages``).
        """
        rl = self.rlaif
        penalty = None
        if rl.kl_placement == "reward" and rollout.ref_logp is not None:
            penalty = klmod.kl_reward_penalty(
                rollout.policy_logp, rollout.ref_logp, rollout.sequences.loss_mask, coef=self.kl_controller.value
            ).reshape(rollout.rewards.shape)
        result = adv.compute_advantages(
            rollout.rewards,
            baseline=rl.baseline,
            scale_by_std=rl.scale_by_std,
            whiten=rl.whiten_advantages,
            skip_zero_variance=rl.skip_zero_variance_groups,
            kl_penalty=penalty,
            ema_state=self.ema,
        )
        if self.ema is not None:
            self.ema.update(result.mean_reward)
        train = result.train_mask
        mask = rollout.sequences.loss_mask * train.reshape(-1, 1).astype(np.float32)
        weights = aggregation_weights(mask, aggregation=self.aggregation, max_tokens=rl.max_new_tokens)
        stats = {
            "zero_variance_groups": int(result.zero_variance_groups),
            "unscored": int((~result.valid_mask).sum()),
            "advantage_abs_mean": float(np.abs(result.advantages[train]).mean()) if train.any() else 0.0,
        }
        return result.advantages.reshape(-1).astype(np.float32), weights.astype(np.float32), stats

    def observe_kl(self, rollout: Rollout) -> tuple[float, float]:
        """Measures the rollout's per-token KL to the reference and moves the coefficient toward its target.

        Returns:
            ``(kl_token, kl_coef)``: the KL (NaN without reference log-probs) and the
            coefficient this step used, before the update.
        """
        kl_token = (
            klmod.masked_mean_kl(
                rollout.policy_logp, rollout.ref_logp, rollout.sequences.loss_mask, estimator=self.rlaif.kl_estimator
            ).token_mean
            if rollout.ref_logp is not None
            else float("nan")
        )
        kl_coef = self.kl_controller.value
        self.kl_controller.update(kl_token, 1)  # one optimizer step; the horizon is in steps
        return kl_token, kl_coef

    def state_dict(self) -> dict[str, Any]:
        """``kl_controller`` and ``ema`` (None without an EMA baseline), as the checkpoint keeps them."""
        return {"kl_controller": self.kl_controller.state_dict(), "ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


def kl_horizon_steps(rlaif: RlaifConfig, training: TrainingConfig) -> float:
    """The adaptive KL controller's horizon in optimizer steps.

    ``rlaif.kl_horizon_steps``; a config with the old ``rlaif.kl_horizon`` (in samples)
    instead gets the same horizon it always had: ``kl_horizon / (batch_size * samples per prompt)``.
    """
    if rlaif.kl_horizon_steps is not None:
        return float(rlaif.kl_horizon_steps)
    assert rlaif.kl_horizon is not None  # the config keeps exactly one of the two
    return rlaif.kl_horizon / (training.batch_size * rlaif.num_samples_per_prompt)
