"""Hand-computed checks of group baselines, std scaling, whitening, NaN exclusion, EMA and the KL
penalty in the reward, then every combination of the advantage options the config accepts against
the loop-by-loop reference in ``rl_reference``."""

import itertools
import json
import math
import typing

import numpy as np
import pytest
import rl_reference as ref
from pydantic import ValidationError

from rlaif_mlx.config import RlaifConfig
from rlaif_mlx.rl.advantages import AdvantageResult, EmaBaseline, apply_zero_variance_skip, compute_advantages

NAN = float("nan")
# Two prompts, three samples each. Group means: 2 and 2.
R = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])


def test_group_mean():
    res = compute_advantages(R, baseline="group_mean")
    assert isinstance(res, AdvantageResult)
    # row 0: [1-2, 2-2, 3-2]; row 1: [0-2, 0-2, 6-2]
    np.testing.assert_allclose(res.advantages, [[-1, 0, 1], [-2, -2, 4]])
    np.testing.assert_allclose(res.group_mean, [2, 2])
    assert res.zero_variance_groups == 0
    assert res.valid_mask.all()
    assert res.mean_reward == pytest.approx(12 / 6)


def test_leave_one_out():
    res = compute_advantages(R, baseline="leave_one_out")
    # row 0: 1-(2+3)/2 = -1.5, 2-(1+3)/2 = 0, 3-(1+2)/2 = 1.5
    # row 1: 0-(0+6)/2 = -3, 0-(0+6)/2 = -3, 6-(0+0)/2 = 6
    np.testing.assert_allclose(res.advantages, [[-1.5, 0, 1.5], [-3, -3, 6]])


def test_std_scaling_uses_population_std():
    eps = 1e-6
    res = compute_advantages(R, baseline="group_mean", scale_by_std=True, eps=eps)
    std0 = math.sqrt((1 + 0 + 1) / 3)  # ddof=0
    std1 = math.sqrt((4 + 4 + 16) / 3)  # = sqrt(8)
    np.testing.assert_allclose(res.group_std, [std0, std1])
    expected = [[-1 / (std0 + eps), 0, 1 / (std0 + eps)], [-2 / (std1 + eps), -2 / (std1 + eps), 4 / (std1 + eps)]]
    np.testing.assert_allclose(res.advantages, expected)


def test_whitening_over_batch():
    eps = 1e-6
    res = compute_advantages(R, baseline="group_mean", whiten=True, eps=eps)
    # advantages [-1,0,1,-2,-2,4]: mean 0, var (1+0+1+4+4+16)/6 = 26/6
    std = math.sqrt(26 / 6)
    np.testing.assert_allclose(res.advantages, np.array([[-1, 0, 1], [-2, -2, 4]]) / (std + eps))
    assert res.advantages.mean() == pytest.approx(0.0, abs=1e-12)
    assert res.advantages.std() == pytest.approx(1.0, abs=1e-5)


def test_none_baseline_is_raw_rewards():
    res = compute_advantages(R, baseline="none")
    np.testing.assert_allclose(res.advantages, R)


def test_nan_excluded_and_zero_variance_counted():
    rewards = np.array(
        [
            [1.0, NAN, 3.0],  # mean over valid = 2 -> [-1, 0, 1]
            [5.0, 5.0, 5.0],  # all equal: zero variance
            [NAN, NAN, NAN],  # nothing scored: zero variance
            [4.0, NAN, NAN],  # one valid: zero variance
            [0.0, 1.0, NAN],  # mean 0.5 -> [-0.5, 0.5, 0]
        ]
    )
    res = compute_advantages(rewards, baseline="group_mean")
    np.testing.assert_allclose(res.advantages, [[-1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [-0.5, 0.5, 0]])
    assert not np.isnan(res.advantages).any()
    np.testing.assert_array_equal(res.valid_mask, ~np.isnan(rewards))
    np.testing.assert_array_equal(res.zero_variance_mask, [False, True, True, True, False])
    assert res.zero_variance_groups == 3
    # mean over valid: (1+3+15+4+0+1)/8
    assert res.mean_reward == pytest.approx(24 / 8)
    keep = apply_zero_variance_skip(res)
    np.testing.assert_array_equal(keep, [[1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 0]])


def test_nan_leave_one_out_and_std():
    rewards = np.array([[1.0, NAN, 3.0]])
    loo = compute_advantages(rewards, baseline="leave_one_out")
    np.testing.assert_allclose(loo.advantages, [[1 - 3, 0, 3 - 1]])
    sc = compute_advantages(rewards, baseline="group_mean", scale_by_std=True, eps=0.0)
    # valid {1, 3}: mean 2, population std 1
    np.testing.assert_allclose(sc.advantages, [[-1, 0, 1]])


def test_whiten_ignores_invalid():
    rewards = np.array([[0.0, 2.0, NAN]])
    res = compute_advantages(rewards, baseline="none", whiten=True, eps=0.0)
    # valid [0, 2]: mean 1, std 1 -> [-1, 1]; invalid stays 0
    np.testing.assert_allclose(res.advantages, [[-1, 1, 0]])


def test_whitening_statistics_leave_out_skipped_groups():
    """The issue's item 5: the zeros of dropped groups used to shrink the std and inflate every advantage."""
    rewards = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # group 0: mean 0.5, std 0.5 -> scaled [-1, 1, -1, 1]; groups 1 and 2 are flat and skipped.
    # Over the 4 samples that train: mean 0, std 1 -> [-1, 1, -1, 1] / (1 + eps).
    res = compute_advantages(rewards, baseline="group_mean", scale_by_std=True, whiten=True, skip_zero_variance=True)
    np.testing.assert_allclose(res.advantages[0], np.array([-1, 1, -1, 1]) / (1 + 1e-6))
    assert (res.advantages[1:] == 0).all()
    np.testing.assert_array_equal(res.train_mask, [[True] * 4, [False] * 4, [False] * 4])
    # The old statistics took all 12: std sqrt(4 / 12) = 0.577, so +-1 became +-1.73.
    assert 1 / math.sqrt(4 / 12) == pytest.approx(1.732, abs=1e-3)
    # Not skipped, the flat groups train with advantage 0, and so count: the same +-1.73.
    kept = compute_advantages(rewards, baseline="group_mean", scale_by_std=True, whiten=True)
    np.testing.assert_allclose(kept.advantages[0], np.array([-1, 1, -1, 1]) / (math.sqrt(4 / 12) + 1e-6))
    assert kept.train_mask.all()


def test_issue_example_all_pass_group_with_kl_in_the_reward():
    """Rewards 1, 1, 1, 1; beta 0.05; per-token KL about 0.02 over 10 tokens: sequence KLs
    0.193, 0.209, 0.187, 0.211 (mean 0.2; deviations -0.007, +0.009, -0.013, +0.011)."""
    beta, kl = 0.05, np.array([0.193, 0.209, 0.187, 0.211])
    rewards = np.ones((1, 4))
    # The old code subtracted the penalty first: rewards 1 - beta*KL, then centred and divided by their std.
    # Centred: -beta * deviations = [0.00035, -0.00045, 0.00065, -0.00055];
    # std = beta * sqrt((49 + 81 + 169 + 121) / 4) * 1e-3 = 0.05 * 0.0102470 = 0.00051235;
    # divided (with eps 1e-6): [0.682, -0.877, 1.266, -1.071]: KL noise at full size.
    penalised = 1.0 - beta * kl
    old = (penalised - penalised.mean()) / (penalised.std() + 1e-6)
    np.testing.assert_allclose(old, [0.682, -0.877, 1.266, -1.071], atol=1e-3)
    # Now: the task rewards are flat, so the task advantage is 0 and the group counts as zero-variance;
    # the penalty joins centred and unscaled: -(beta*KL - mean) = [0.00035, -0.00045, 0.00065, -0.00055].
    res = compute_advantages(rewards, baseline="group_mean", scale_by_std=True, kl_penalty=beta * kl[None, :])
    np.testing.assert_allclose(res.advantages, [[0.00035, -0.00045, 0.00065, -0.00055]], atol=1e-12)
    assert res.zero_variance_groups == 1 and res.group_std[0] == 0.0
    # skip_zero_variance_groups now sees the flat task rewards and drops the group entirely.
    skipped = compute_advantages(
        rewards, baseline="group_mean", scale_by_std=True, skip_zero_variance=True, kl_penalty=beta * kl[None, :]
    )
    assert (skipped.advantages == 0).all() and not skipped.train_mask.any()


def test_kl_penalty_joins_after_std_scaling_and_whitening():
    rewards = np.array([[0.0, 1.0], [2.0, 4.0]])
    pen = np.array([[0.1, 0.3], [0.5, 0.5]])
    res = compute_advantages(rewards, baseline="group_mean", scale_by_std=True, kl_penalty=pen, eps=0.0)
    # scaled task advantages [-1, 1] in both groups; penalties centred: [-0.1, 0.1] and [0, 0]
    # A = task - (pen - centre): [-1 + 0.1, 1 - 0.1] and [-1, 1]
    np.testing.assert_allclose(res.advantages, [[-0.9, 0.9], [-1.0, 1.0]])
    res = compute_advantages(rewards, baseline="none", whiten=True, kl_penalty=pen, eps=0.0)
    # raw [0, 1, 2, 4]: mean 1.75, std sqrt((3.0625 + 0.5625 + 0.0625 + 5.0625) / 4) = sqrt(2.1875)
    s = math.sqrt(2.1875)
    np.testing.assert_allclose(res.advantages, [[-1.75 / s + 0.1, -0.75 / s - 0.1], [0.25 / s, 2.25 / s]])
    # An unscored sample neither takes a penalty nor enters its group's centre.
    res = compute_advantages(np.array([[0.0, 1.0, NAN]]), kl_penalty=np.array([[0.2, 0.4, 9.0]]), eps=0.0)
    np.testing.assert_allclose(res.advantages, [[-0.5 + 0.1, 0.5 - 0.1, 0.0]])


def test_ema_baseline():
    ema = EmaBaseline(decay=0.9)
    # No value yet: the batch mean (2) is the baseline.
    res = compute_advantages(np.array([[1.0, 2.0, 3.0]]), baseline="ema", ema_state=ema)
    np.testing.assert_allclose(res.advantages, [[-1, 0, 1]])
    assert ema.value is None  # compute_advantages does not mutate
    assert ema.update(res.mean_reward) == pytest.approx(2.0)  # seeds
    assert ema.update(4.0) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)  # 2.2
    assert ema.update(NAN) == pytest.approx(2.2)
    res = compute_advantages(np.array([[1.0, 3.2]]), baseline="ema", ema_state=ema)
    np.testing.assert_allclose(res.advantages, [[1 - 2.2, 3.2 - 2.2]])
    state = json.loads(json.dumps(ema.state_dict()))
    other = EmaBaseline()
    other.load_state_dict(state)
    assert other == ema


def test_errors():
    with pytest.raises(ValueError, match="ema_state"):
        compute_advantages(R, baseline="ema")
    with pytest.raises(ValueError, match="Unknown baseline"):
        compute_advantages(R, baseline="median")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        compute_advantages(np.zeros(3))
    with pytest.raises(ValueError, match="decay"):
        EmaBaseline(decay=1.0)


def test_std_scaling_leaves_zero_variance_groups_unscaled_for_ema():
    """An EMA baseline does not centre a group: dividing its zero spread by eps gave ~1e6."""
    ema = EmaBaseline(decay=0.9, value=0.5)
    result = compute_advantages(
        np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5]]), baseline="ema", scale_by_std=True, ema_state=ema
    )
    assert result.advantages[0].tolist() == [0.5, 0.5, 0.5]  # 1 - 0.5, unscaled
    std = np.std([0.0, 1.0, 0.5])
    np.testing.assert_allclose(result.advantages[1], (np.array([0.0, 1.0, 0.5]) - 0.5) / (std + 1e-6))


# ---- every combination the config accepts --------------------------------------------------------------

# Four prompts, four samples: a flat all-pass group, one with an unscored sample, a varied one,
# and a flat group of two scored zeros. Sequence KLs (nats, beta not applied) for the reward placement.
COMBO_REWARDS = [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.5, None], [0.2, 0.6, 0.0, 0.2], [0.0, 0.0, None, None]]
COMBO_KL = [[0.19, 0.21, 0.18, 0.22], [0.4, 0.1, 0.25, 0.3], [0.05, 0.5, 0.2, 0.15], [0.3, 0.1, 0.2, 0.2]]
BETA = 0.05


def _options(name: str) -> tuple:
    return typing.get_args(RlaifConfig.model_fields[name].annotation) or (False, True)


def accepted(**fixed) -> list[dict]:
    """Every combination of the named rlaif keys that ``RlaifConfig`` accepts (the others at default)."""
    names = list(fixed)
    found = []
    for values in itertools.product(*(_options(n) for n in names)):
        combo = dict(zip(names, values, strict=True))
        try:
            RlaifConfig(**combo)
        except ValidationError:
            continue
        found.append(combo)
    return found


ADVANTAGE_COMBOS = accepted(baseline=..., scale_by_std=..., whiten_advantages=..., skip_zero_variance_groups=...)


def test_the_config_refuses_only_std_scaling_without_a_baseline():
    # 4 baselines x 2 x 2 x 2 = 32, of which baseline none with scale_by_std (x 2 x 2) is refused.
    assert len(ADVANTAGE_COMBOS) == 28
    assert not any(c["baseline"] == "none" and c["scale_by_std"] for c in ADVANTAGE_COMBOS)


@pytest.mark.parametrize("kl_in_reward", [False, True], ids=["no-kl", "kl-in-reward"])
@pytest.mark.parametrize("combo", ADVANTAGE_COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_accepted_combination_matches_the_reference(combo, kl_in_reward):
    rewards = np.array([[NAN if r is None else r for r in g] for g in COMBO_REWARDS])
    penalty = BETA * np.array(COMBO_KL) if kl_in_reward else None
    ema = EmaBaseline(value=0.4) if combo["baseline"] == "ema" else None
    got = compute_advantages(
        rewards,
        baseline=combo["baseline"],
        scale_by_std=combo["scale_by_std"],
        whiten=combo["whiten_advantages"],
        skip_zero_variance=combo["skip_zero_variance_groups"],
        kl_penalty=penalty,
        ema_state=ema,
    )
    want, trains, flat = ref.advantages(
        COMBO_REWARDS,
        baseline=combo["baseline"],
        scale_by_std=combo["scale_by_std"],
        whiten=combo["whiten_advantages"],
        skip=combo["skip_zero_variance_groups"],
        penalty=[[BETA * k for k in row] for row in COMBO_KL] if kl_in_reward else None,
        ema_value=0.4,
    )
    np.testing.assert_allclose(got.advantages, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got.train_mask, trains)
    assert got.zero_variance_groups == flat == 2  # the task rewards decide, KL or not
    # The all-pass group: task advantage 0 under a centred baseline, whatever the KL does (skipped: all 0).
    if combo["baseline"] in ("group_mean", "leave_one_out") and not combo["whiten_advantages"]:
        kl_part = penalty[0] - penalty[0].mean() if kl_in_reward and got.train_mask[0].all() else 0.0
        np.testing.assert_allclose(got.advantages[0] + kl_part, 0.0, atol=1e-12)
