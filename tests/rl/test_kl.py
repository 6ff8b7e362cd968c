"""KL estimators, masked KL, the adaptive controller and the KL-in-reward penalty, by hand."""

import json
import math

import numpy as np
import pytest

from rlaif_mlx.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    k1,
    k2,
    k3,
    kl_estimate,
    kl_penalised_rewards,
    masked_mean_kl,
)

E = math.e


def test_k1_k2_k3_values():
    # logp=-1, ref=-2: d = ref - logp = -1
    assert k1(-1.0, -2.0) == pytest.approx(1.0)
    assert k2(-1.0, -2.0) == pytest.approx(0.5)
    assert k3(np.float64(-1.0), np.float64(-2.0)) == pytest.approx(math.exp(-1) + 1 - 1)  # e^-1
    # logp=-2, ref=-1: d = 1 -> e - 1 - 1
    assert k3(np.float64(-2.0), np.float64(-1.0)) == pytest.approx(E - 2)
    assert k3(np.float64(-0.7), np.float64(-0.7)) == 0.0
    assert kl_estimate(np.float64(-2.0), np.float64(-1.0), estimator="k1") == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        kl_estimate(0.0, 0.0, estimator="k9")


def test_k3_non_negative():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1000)) * 3
    assert (k3(a, b) >= 0).all()


def test_k3_on_torch_and_mlx():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    assert torch.allclose(k3(torch.tensor([-2.0]), torch.tensor([-1.0]), xp=torch), torch.tensor([E - 2]))
    assert abs(k3(mx.array([-2.0]), mx.array([-1.0]), xp=mx).item() - (E - 2)) < 1e-6


def test_masked_mean_kl():
    logp = np.array([[-1.0, -2.0, -np.inf], [-1.0, -1.0, -1.0]])
    ref = np.array([[-2.0, -1.0, 5.0], [-3.0, -3.0, -3.0]])
    mask = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = masked_mean_kl(logp, ref, mask)
    # k3: t0 d=-1 -> e^-1; t1 d=1 -> e-2; -inf on padding must not leak.
    row0 = math.exp(-1) + (E - 2)
    np.testing.assert_allclose(out.sequence_sums, [row0, 0.0])
    assert out.token_mean == pytest.approx(row0 / 2)
    assert out.sequence_mean == pytest.approx(row0)  # only row 0 has tokens
    k1_out = masked_mean_kl(logp, ref, mask, estimator="k1")
    np.testing.assert_allclose(k1_out.sequence_sums, [1.0 + -1.0, 0.0])
    empty = masked_mean_kl(logp, ref, np.zeros_like(mask))
    assert empty.token_mean == 0.0 and empty.sequence_mean == 0.0


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # e = 12/6 - 1 = 1 -> clipped to 0.2; 0.1 * (1 + 0.2 * 1000/10000) = 0.102
    assert ctl.update(12.0, 1000) == pytest.approx(0.102)
    # e = 4.5/6 - 1 = -0.25 -> clipped to -0.2; 0.102 * (1 - 0.2 * 500/10000) = 0.102 * 0.99
    assert ctl.update(4.5, 500) == pytest.approx(0.10098)
    # e = 6.6/6 - 1 = 0.1 (inside the clip); * (1 + 0.1 * 1000/10000) = * 1.01
    assert ctl.update(6.6, 1000) == pytest.approx(0.10098 * 1.01)
    assert ctl.update(float("nan"), 1000) == pytest.approx(0.10098 * 1.01)
    state = json.loads(json.dumps(ctl.state_dict()))
    other = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    other.load_state_dict(state)
    assert (other.value, other.target, other.horizon) == (ctl.value, 6.0, 10000.0)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 10) == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_kl_penalised_rewards():
    rewards = np.array([1.0, 2.0])
    logp = np.array([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    ref = np.array([[-2.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = kl_penalised_rewards(rewards, logp=logp, ref_logp=ref, mask=mask, coef=0.1)
    # row 0: sum k1 = (-1+2) + (-2+1) = 0 -> 1.0; row 1: 0.5 + 0.5 = 1 -> 2 - 0.1
    np.testing.assert_allclose(out, [1.0, 1.9])
