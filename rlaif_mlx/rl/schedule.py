"""Learning-rate schedule shared by both backends: warmup, then constant/linear/cosine.

Pure Python so MLX and PyTorch compute the exact same number for a step.
"""

from __future__ import annotations

import math
from typing import Any, Literal

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def learning_rate_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warmup: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``,
    so the first step already moves (a 0 learning rate would waste it) and
    step ``warmup_steps - 1`` reaches ``base_lr``.

    Decay: with ``progress = (step - warmup_steps) / (total_steps -
    warmup_steps)`` clipped to [0, 1] and ``min_lr = base_lr * min_lr_ratio``:
    constant ``base_lr``; linear ``min_lr + (base_lr - min_lr) * (1 -
    progress)``; cosine ``min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi *
    progress))``. The first step after warmup uses ``base_lr``; steps at or
    past ``total_steps`` use ``min_lr``.

    Args:
        step: 0-based optimizer step.
        base_lr: peak learning rate.
        warmup_steps: number of warmup steps (0 = none).
        total_steps: planned number of optimizer steps.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        min_lr_ratio: floor of the decay as a fraction of ``base_lr``.

    Returns:
        The learning rate as a float.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown LR schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    if step < 0 or warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"Need step >= 0, warmup_steps >= 0, total_steps >= 1; got {step}, {warmup_steps}, {total_steps}."
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")

    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return float(base_lr)
    min_lr = base_lr * min_lr_ratio
    if step >= total_steps:
        progress = 1.0  # also covers warmup_steps >= total_steps
    else:
        progress = min(max((step - warmup_steps) / (total_steps - warmup_steps), 0.0), 1.0)
    if schedule == "linear":
        return min_lr + (base_lr - min_lr) * (1.0 - progress)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_learning_rate(step: int, training: Any, *, total_steps: int) -> float:
    """``learning_rate_at`` with the knobs of a ``training`` config section."""
    return learning_rate_at(
        step,
        base_lr=training.learning_rate,
        warmup_steps=training.warmup_steps,
        total_steps=total_steps,
        schedule=training.lr_scheduler_type,
        min_lr_ratio=training.min_lr_ratio,
    )
