"""Hand-computed checks of group baselines, std scaling, whitening, NaN exclusion, EMA."""

import json
import math

import numpy as np
import pytest

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
