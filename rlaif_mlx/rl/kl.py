"""KL estimators, the adaptive KL controller, and the "KL in the reward" penalty.

Notation (DESIGN.md): policy log-probs ``logp``, reference log-probs
``ref_logp``, both ``[N, T-1]`` aligned with ``input_ids[:, 1:]``;
``d = ref_logp - logp``. Per-token estimators of KL(pi || ref) for tokens
sampled from pi (Schulman, "Approximating KL divergence", 2020):

- k1 = ``logp - ref_logp`` = ``-d``: unbiased, can be negative per token.
- k2 = ``0.5 * d**2``: biased, low variance, non-negative.
- k3 = ``exp(d) - d - 1``: unbiased, non-negative (``e^x >= 1 + x``).

The estimators use only arithmetic operators plus ``xp.exp``, so the same
function runs on numpy, torch and mlx arrays; pass the namespace ``xp``
(numpy, or an ``ArrayOps`` from ``objective.py``). No framework imports here.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def k1(logp: Any, ref_logp: Any) -> Any:
    """k1 = logp - ref_logp, element-wise. Shapes: any, equal; returns the same shape."""
    return logp - ref_logp


def k2(logp: Any, ref_logp: Any) -> Any:
    """k2 = 0.5 * (ref_logp - logp)**2, element-wise. Returns the input shape."""
    d = ref_logp - logp
    return 0.5 * (d * d)


def k3(logp: Any, ref_logp: Any, *, xp: Any = np) -> Any:
    """k3 = exp(d) - d - 1 with d = ref_logp - logp, element-wise.

    Args:
        logp: policy log-probs, e.g. ``[N, T-1]``.
        ref_logp: reference log-probs, same shape.
        xp: anything with an ``exp`` (numpy module, an ``ArrayOps``).

    Returns:
        Same shape as the inputs, >= 0 (up to rounding), 0 where equal.
    """
    d = ref_logp - logp
    return xp.exp(d) - d - 1.0


def kl_estimate(logp: Any, ref_logp: Any, *, estimator: KLEstimator = "k3", xp: Any = np) -> Any:
    """Dispatch to ``k1``/``k2``/``k3`` by name. Returns the input shape."""
    if estimator == "k1":
        return k1(logp, ref_logp)
    if estimator == "k2":
        return k2(logp, ref_logp)
    if estimator == "k3":
        return k3(logp, ref_logp, xp=xp)
    raise ValueError(f"Unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}.")


class MaskedKL(NamedTuple):
    """KL measured over completion tokens.

    Attributes:
        token_mean: mean per-token KL over all masked tokens of the batch
            (0.0 when the mask is empty).
        sequence_sums: ``[N]`` per-sequence KL, summed over its masked tokens.
        sequence_mean: mean of ``sequence_sums`` over rows with at least one
            token (0.0 when none); the quantity Ziegler et al. control.
    """

    token_mean: float
    sequence_sums: np.ndarray
    sequence_mean: float


def masked_mean_kl(
    logp: np.ndarray,
    ref_logp: np.ndarray,
    mask: np.ndarray,
    *,
    estimator: KLEstimator = "k3",
) -> MaskedKL:
    """Per-token mean and per-sequence sums of a KL estimate over the mask.

    Args:
        logp: ``[N, T-1]`` policy log-probs.
        ref_logp: ``[N, T-1]`` reference log-probs.
        mask: ``[N, T-1]`` 1.0 on completion tokens, 0.0 elsewhere.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        A ``MaskedKL``.
    """
    mask = np.asarray(mask, dtype=np.float64)
    on = mask != 0
    # Padding may hold -inf or garbage log-probs: zero the log-ratio there first.
    lp = np.where(on, np.asarray(logp, dtype=np.float64), 0.0)
    ref = np.where(on, np.asarray(ref_logp, dtype=np.float64), 0.0)
    per_token = kl_estimate(lp, ref, estimator=estimator, xp=np) * mask
    sequence_sums = per_token.sum(axis=1)
    n_tokens = mask.sum()
    rows = mask.sum(axis=1) > 0
    return MaskedKL(
        token_mean=float(per_token.sum() / n_tokens) if n_tokens > 0 else 0.0,
        sequence_sums=sequence_sums,
        sequence_mean=float(sequence_sums[rows].mean()) if rows.any() else 0.0,
    )


def kl_reward_penalty(
    logp: np.ndarray,
    ref_logp: np.ndarray,
    mask: np.ndarray,
    *,
    coef: float,
) -> np.ndarray:
    """The "KL in the reward" penalty (PPO / Ziegler): ``coef * sum_t k1`` per sequence.

    k1 whatever the configured estimator: as a reward only the exact log-ratio
    has a score-function gradient equal to the KL's (the k3 of a sample also
    depends on the policy, and that dependence would be dropped).
    ``advantages.compute_advantages(kl_penalty=...)`` subtracts it after the
    task rewards are normalised, centred on each group.

    Args:
        logp: ``[N, T-1]`` policy (behaviour) log-probs.
        ref_logp: ``[N, T-1]`` reference log-probs.
        mask: ``[N, T-1]`` completion-token mask.
        coef: KL coefficient beta.

    Returns:
        ``[N]`` float64 penalties, in reward units.
    """
    return coef * masked_mean_kl(logp, ref_logp, mask, estimator="k1").sequence_sums


class FixedKLController:
    """A KL coefficient that never moves; same interface as the adaptive one."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: float = 1) -> float:
        """Ignore the measurement. Returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Plain floats for the checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., 2019, "Fine-Tuning LMs from Human Preferences").

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``coef <- coef * (1 + e * n_steps / horizon)``. The clip bounds how fast
    the coefficient moves when the measured KL is far from the target: with the
    KL held above ``target * 1.2`` the coefficient grows by ``(1 + 0.2 / horizon)``
    a step, so it doubles in ``ln 2 / ln(1 + 0.2 / horizon)`` steps (139 at
    ``horizon = 40``). ``horizon`` and ``n_steps`` share one unit; the trainer
    counts optimizer steps (``rlaif.kl_horizon_steps``).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0:
            raise ValueError(f"KL target must be > 0, got {target}.")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}.")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: float = 1) -> float:
        """Move the coefficient toward keeping KL near ``target``.

        Args:
            current_kl: the measured KL (same units as ``target``). NaN is
                ignored so a bad batch cannot poison the coefficient.
            n_steps: how many steps the measurement covers, in ``horizon``'s unit.

        Returns:
            The new coefficient.
        """
        current_kl = float(current_kl)
        if np.isnan(current_kl):
            return self.value
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Plain floats for the checkpoint (target and horizon for the reader; the config sets them)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient that ``state_dict`` saved.

        Target and horizon stay as constructed: they come from the config, which a
        resume checks is unchanged, and a checkpoint from before the horizon was
        counted in steps holds it in samples.
        """
        self.value = float(state["value"])
