"""One step's policy update: the loss settings, this process's rows of the batch, and the optimizer steps.

The learning rate follows RL steps (which the trainer owns and checkpoints), so
``updates_per_batch > 1`` does not run the schedule faster. A batch with no
token weight (nothing scored, or every group skipped) is not updated at all:
an optimizer step on a zero gradient would still move the weights through
Adam's momentum.
"""

from __future__ import annotations

import numpy as np

from ..backends.base import Backend, LossSettings, StepStats, TrainBatch
from ..config import RlaifConfig, TrainingConfig
from .distributed import DistContext
from .records import Rollout


def update_policy(
    backend: Backend,
    rollout: Rollout,
    advantages: np.ndarray,
    weights: np.ndarray,
    *,
    training: TrainingConfig,
    rlaif: RlaifConfig,
    kl_coef: float,
    learning_rate: float,
    dist: DistContext,
    stale: bool = False,
) -> StepStats:
    """``training.updates_per_batch`` optimizer steps on the rollout; returns the last one's statistics.

    Args:
        backend: the model and optimizer.
        rollout: this process's share of the step's samples.
        advantages: ``[B*G]`` for the whole batch (this process trains on its rows).
        weights: ``[B*G, T-1]`` token weights for the whole batch.
        training: the ``training`` section (clipping, updates per batch).
        rlaif: the ``rlaif`` section (where the KL term goes, its estimator, the sampling temperature
            the policy is trained at).
        kl_coef: the KL coefficient of this step.
        learning_rate: this step's scheduled learning rate.
        dist: this process's place in the job.
        stale: an older policy sampled the rollout (``sample_ahead``): the ratio is taken against it.

    Returns:
        The backend's ``StepStats``; ``extra["update_skipped"] == 1.0`` when there was nothing to train on.
    """
    kl_in_loss = rlaif.kl_placement == "loss" and rollout.ref_logp is not None
    if not weights.any():  # over the whole batch: every process skips alike
        return StepStats(
            loss=0.0,
            pg_loss=0.0,
            kl=0.0,
            clip_fraction=0.0,
            ratio_mean=1.0,
            grad_norm=0.0,
            lr=0.0,
            extra={"update_skipped": 1.0},
        )
    settings = LossSettings(
        clip_eps_low=training.clip_eps_low,
        clip_eps_high=training.clip_eps_high,
        kl_coef=kl_coef if kl_in_loss else 0.0,
        kl_estimator=rlaif.kl_estimator,
        temperature=rlaif.generation_temperature,  # the sampled policy is the trained one
    )
    rows, width = rollout.sequences.loss_mask.shape
    behaviour = training.updates_per_batch > 1 or stale
    batch = TrainBatch(
        sequences=rollout.sequences,
        advantages=dist.local_rows(advantages, rows),
        token_weights=dist.local_rows(weights, rows)[:, :width],
        # one update on fresh samples: the ratio is against the current policy exactly (stop-gradient);
        # several, or samples from before the last update: against the behaviour policy that sampled them
        old_logp=rollout.policy_logp if behaviour else None,
        ref_logp=rollout.ref_logp if kl_in_loss else None,
    )
    stats = None
    for _ in range(training.updates_per_batch):
        stats = backend.train_step(batch, loss=settings, learning_rate=learning_rate)
    return stats
