"""The RL math restated sample by sample, in plain Python floats, for the tests to check against.

Written from the definitions in the README and the ``rl/`` docstrings, with loops, ``math`` and
``statistics``, and without calling the package: an error in the package's vectorised numpy does
not cancel out here. Rewards are lists of groups, ``None`` = unscored; token rows are lists.

The definitions, in the order they apply:

1. Group statistics over the scored TASK rewards: mean, population std, "flat" (fewer than two
   scored, or all equal).
2. A sample trains when it is scored and its group is not flat-and-skipped.
3. Baseline: group mean | mean of the other scored samples (0 when alone) | the EMA value | 0.
4. Std scaling: divide by (std + eps), flat groups left as they are.
5. Whitening: (a - mean) / (std + eps) over the samples that train.
6. KL in the reward: subtract beta * (KL_i - the mean of KL over the group's training samples),
   KL_i = sum of k1 = logp - ref_logp over the sample's completion tokens.
7. Loss (one update, ratio 1, token mean over the training rows):
   sum over training tokens of (-A_i + beta_loss * k(logp, ref_logp)) / their count.
"""

from __future__ import annotations

import math
import statistics

EPS = 1e-6


def k1(logp: float, ref: float) -> float:
    return logp - ref


def k3(logp: float, ref: float) -> float:
    d = ref - logp
    return math.exp(d) - d - 1.0


def sequence_k1(logp_row, ref_row, mask_row) -> float:
    """Sum of k1 over the row's completion tokens."""
    return sum(k1(lp, rf) for lp, rf, m in zip(logp_row, ref_row, mask_row, strict=True) if m)


def advantages(rewards, *, baseline, scale_by_std, whiten, skip, penalty=None, ema_value=None):
    """Steps 1-6. Returns ``(advantages, trains, flat_groups)``: lists of rows, and a count."""
    everything = [r for group in rewards for r in group if r is not None]
    out, trains, flat_groups = [], [], 0
    for group in rewards:
        scored = [r for r in group if r is not None]
        flat = len(scored) < 2 or len(set(scored)) == 1
        flat_groups += flat
        mean = statistics.fmean(scored) if scored else 0.0
        std = statistics.pstdev(scored) if scored else 0.0
        row, train_row = [], []
        for r in group:
            trains_here = r is not None and not (skip and flat)
            train_row.append(trains_here)
            if not trains_here:
                row.append(0.0)
                continue
            if baseline == "group_mean":
                a = r - mean
            elif baseline == "leave_one_out":
                a = 0.0 if len(scored) == 1 else r - (sum(scored) - r) / (len(scored) - 1)
            elif baseline == "ema":
                a = r - (statistics.fmean(everything) if ema_value is None else ema_value)
            else:
                a = r
            if scale_by_std and not flat:
                a = a / (std + EPS)
            row.append(a)
        out.append(row)
        trains.append(train_row)
    if whiten:
        vals = [a for row, train_row in zip(out, trains, strict=True) for a, t in zip(row, train_row, strict=True) if t]
        if vals:
            m, s = statistics.fmean(vals), statistics.pstdev(vals)
            out = [
                [(a - m) / (s + EPS) if t else 0.0 for a, t in zip(row, tr, strict=True)]
                for row, tr in zip(out, trains, strict=True)
            ]
    if penalty is not None:
        for row, train_row, pen in zip(out, trains, penalty, strict=True):
            pens = [p for p, t in zip(pen, train_row, strict=True) if t]
            centre = statistics.fmean(pens) if pens else 0.0
            for j, t in enumerate(train_row):
                if t:
                    row[j] -= pen[j] - centre
    return out, trains, flat_groups


def token_mean_loss(adv_rows, train_rows, logp, ref, mask, *, beta_loss, estimator="k3"):
    """Step 7. ``adv_rows``/``train_rows`` are ``[B][G]``; ``logp``/``ref``/``mask`` are ``[B*G][T-1]``."""
    flat_adv = [a for row in adv_rows for a in row]
    flat_train = [t for row in train_rows for t in row]
    kl = k3 if estimator == "k3" else k1
    total, count = 0.0, 0
    for i, (a, t) in enumerate(zip(flat_adv, flat_train, strict=True)):
        if not t:
            continue
        for lp, rf, m in zip(logp[i], ref[i], mask[i], strict=True):
            if m:
                total += -a + beta_loss * kl(lp, rf)
                count += 1
    return total / count if count else 0.0


def token_mean_kl(logp, ref, mask, *, estimator) -> float:
    """The measured KL: the estimator's mean over every completion token of the batch."""
    kl = k3 if estimator == "k3" else k1
    vals = [
        kl(lp, rf)
        for lrow, rrow, mrow in zip(logp, ref, mask, strict=True)
        for lp, rf, m in zip(lrow, rrow, mrow, strict=True)
        if m
    ]
    return statistics.fmean(vals) if vals else 0.0
