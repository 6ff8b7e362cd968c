"""The policy loss, written once against a tiny array namespace.

``policy_loss`` uses only arithmetic operators, comparisons, indexing with
``None`` and the methods of ``ArrayOps``; numpy (``NUMPY_OPS``), torch and
mlx.core namespaces all satisfy it, so both backends differentiate the same
code. Framework-specific ``ArrayOps`` live in ``backends/``; nothing here
imports torch or mlx.

Token aggregation and gradient accumulation
-------------------------------------------
The loss is ``sum(per_token_loss * token_weights)``: ``token_weights`` is the
completion mask already divided by the aggregation normaliser
(``aggregation_weights``). Compute the weights over the WHOLE batch, then
slice rows for each micro-batch: the micro-batch losses then sum exactly to
the full-batch loss, so gradient accumulation is exact (no per-micro-batch
re-normalisation, no bias toward micro-batches with few tokens).

Default aggregation: ``"token_mean"`` (DAPO; the token-level choice of
Dr. GRPO's analysis). Every completion token counts equally, so long
completions are not down-weighted per token as under the per-sequence mean
(the length bias GRPO's original ``"sequence_mean"`` has), and padding never
enters a denominator.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np

from rlaif_mlx.rl.kl import KL_ESTIMATORS, KLEstimator, kl_estimate

Aggregation = Literal["token_mean", "sequence_mean", "constant"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "sequence_mean", "constant")
DEFAULT_AGGREGATION: Aggregation = "token_mean"


class ArrayOps(Protocol):
    """The array namespace ``policy_loss`` is written against.

    Arguments are arrays of one framework; ``clip`` takes Python floats for
    its bounds. ``sum`` reduces over all elements to a scalar array.
    ``stop_gradient`` returns its input with gradient flow cut (identity in
    numpy).
    """

    def exp(self, x: Any) -> Any: ...
    def log(self, x: Any) -> Any: ...
    def minimum(self, a: Any, b: Any) -> Any: ...
    def maximum(self, a: Any, b: Any) -> Any: ...
    def clip(self, x: Any, lo: float, hi: float) -> Any: ...
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...
    def sum(self, x: Any) -> Any: ...
    def stop_gradient(self, x: Any) -> Any: ...
    def abs(self, x: Any) -> Any: ...


class NumpyOps:
    """``ArrayOps`` over numpy; no gradients, so ``stop_gradient`` is the identity."""

    def exp(self, x: Any) -> Any:
        return np.exp(x)

    def log(self, x: Any) -> Any:
        return np.log(x)

    def minimum(self, a: Any, b: Any) -> Any:
        return np.minimum(a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return np.maximum(a, b)

    def clip(self, x: Any, lo: float, hi: float) -> Any:
        return np.clip(x, lo, hi)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    def sum(self, x: Any) -> Any:
        return np.sum(x)

    def stop_gradient(self, x: Any) -> Any:
        return x

    def abs(self, x: Any) -> Any:
        return np.abs(x)


NUMPY_OPS = NumpyOps()


def policy_loss(
    xp: ArrayOps,
    *,
    logp: Any,
    old_logp: Any | None,
    ref_logp: Any | None,
    advantages: Any,
    token_weights: Any,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> tuple[Any, dict[str, Any]]:
    """Clipped surrogate (PPO/GRPO) plus an optional KL-to-reference term.

    ``r = exp(logp - old_logp)``;
    ``per_token = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) + kl_coef * k(logp, ref_logp)``;
    ``loss = sum(per_token * token_weights)``.

    Positions with weight 0 (prompt, padding) are zeroed *before* ``exp``, so
    garbage or ``-inf`` log-probs there change neither the loss nor any
    gradient (a plain multiply by 0 would turn ``inf * 0`` into NaN).

    Args:
        xp: the array namespace (``NUMPY_OPS`` or a backend's ``ArrayOps``).
        logp: ``[N, T-1]`` policy log-probs, computed inside the
            differentiated function.
        old_logp: ``[N, T-1]`` behaviour-policy log-probs, or None for a
            single update per batch (``old = stop_gradient(logp)``, r == 1).
        ref_logp: ``[N, T-1]`` reference log-probs, or None; required when
            ``kl_coef != 0``. When given with ``kl_coef == 0`` the KL is still
            reported in the stats.
        advantages: ``[N]`` or ``[N, 1]``, broadcast over tokens.
        token_weights: ``[N, T-1]`` mask divided by the aggregation
            normaliser (see ``aggregation_weights``), same dtype as ``logp``.
        clip_eps_low: lower clip range, ``r >= 1 - eps_low``.
        clip_eps_high: upper clip range, ``r <= 1 + eps_high`` (DAPO's
            clip-higher uses eps_high > eps_low).
        kl_coef: beta for the KL term in the loss (0 = no KL in the loss).
        kl_estimator: ``"k3"`` (default), ``"k2"`` or ``"k1"``.

    Returns:
        ``(loss, stats)``: ``loss`` a scalar array carrying the gradient;
        ``stats`` scalar arrays of the same framework, gradient stopped:
        ``pg_loss`` (``sum(pg * w)``, the surrogate part of ``loss``);
        ``kl``, ``clip_fraction``, ``ratio_mean`` (weighted means
        ``sum(x * w) / sum(w)``, 0 when ``sum(w) == 0``); ``weight_sum``
        (``sum(w)``). To combine micro-batches exactly: add ``pg_loss``;
        for the means, ``sum_mb(stat * weight_sum) / sum_mb(weight_sum)``.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}.")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("kl_coef is non-zero but ref_logp is None: the KL term needs reference log-probs.")

    w = token_weights
    active = w != 0
    zero = w * 0  # clean zeros (w is finite), unlike logp * 0 when logp holds -inf
    if advantages.ndim == 1:
        advantages = advantages[:, None]

    # Sanitise first: -inf - -inf would be NaN even where it is later discarded.
    logp = xp.where(active, logp, zero)
    old = xp.stop_gradient(logp) if old_logp is None else xp.where(active, old_logp, zero)
    ratio = xp.exp(logp - old)
    unclipped = -(ratio * advantages)
    clipped = -(xp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages)
    pg = xp.maximum(unclipped, clipped)  # -min(rA, clip(r)A)
    pg_loss = xp.sum(pg * w)
    loss = pg_loss

    if ref_logp is not None:
        # Both sides are 0 off the mask, so d = 0 there and exp(d) stays finite.
        kl_tok = kl_estimate(logp, xp.where(active, ref_logp, zero), estimator=kl_estimator, xp=xp)
        kl_sum = xp.sum(kl_tok * w)
        if kl_coef != 0:
            loss = loss + kl_coef * kl_sum
    else:
        kl_sum = xp.sum(zero)

    weight_sum = xp.sum(w)
    safe = xp.where(weight_sum > 0, weight_sum, weight_sum * 0 + 1)  # no 0/0 on empty micro-batches
    # The clipped branch is active (no gradient) where it is strictly larger.
    is_clipped = xp.where(clipped > unclipped, w, zero)
    sg = xp.stop_gradient
    stats = {
        "pg_loss": sg(pg_loss),
        "kl": sg(kl_sum / safe),
        "clip_fraction": sg(xp.sum(is_clipped) / safe),
        "ratio_mean": sg(xp.sum(ratio * w) / safe),
        "weight_sum": sg(weight_sum),
    }
    return loss, stats


def aggregation_weights(
    mask: np.ndarray,
    *,
    aggregation: Aggregation = DEFAULT_AGGREGATION,
    max_tokens: int | None = None,
) -> np.ndarray:
    """Per-token loss weights for the whole batch: the mask over its normaliser.

    Args:
        mask: ``[N, T-1]`` 1.0 on completion tokens, 0.0 on prompt/padding.
        aggregation: ``"token_mean"``: ``mask / mask.sum()`` over the whole
            batch (DAPO, token level). ``"sequence_mean"``: ``mask / (row
            token count * rows with any token)``, a per-sequence mean then a
            mean over sequences (GRPO original). ``"constant"``: ``mask / (N *
            max_tokens)`` (Dr. GRPO; ``max_tokens`` = the generation limit).
        max_tokens: required for ``"constant"``.

    Returns:
        ``[N, T-1]`` float64 weights; rows with no tokens are 0 and no
        denominator is ever 0. Slice rows for micro-batches (see module doc).
    """
    mask = np.asarray(mask, dtype=np.float64)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [N, T-1], got shape {mask.shape}.")
    if aggregation == "token_mean":
        total = mask.sum()
        return mask / total if total > 0 else np.zeros_like(mask)
    if aggregation == "sequence_mean":
        row_count = mask.sum(axis=1, keepdims=True)  # [N, 1]
        n_rows = int((row_count > 0).sum())
        if n_rows == 0:
            return np.zeros_like(mask)
        return np.where(row_count > 0, mask / (np.maximum(row_count, 1.0) * n_rows), 0.0)
    if aggregation == "constant":
        if max_tokens is None or max_tokens <= 0:
            raise ValueError("aggregation='constant' needs max_tokens > 0 (the generation length limit).")
        return mask / (mask.shape[0] * float(max_tokens))
    raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}.")
