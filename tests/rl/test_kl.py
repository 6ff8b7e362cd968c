"""KL estimators, masked KL, the adaptive controller and the KL-in-reward penalty, by hand; which
placement/estimator pairs the config accepts; the KL wiring of a step (``AdvantageEstimator``) for
each accepted pair; the controller's horizon at the shipped configs' batch sizes."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rl_reference as ref
import yaml

from rlaif_mlx.config import ConfigError, RlaifConfig, TrainingConfig, load_config
from rlaif_mlx.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    k1,
    k2,
    k3,
    kl_estimate,
    kl_reward_penalty,
    masked_mean_kl,
)
from rlaif_mlx.training.advantage_estimator import AdvantageEstimator, kl_horizon_steps
from rlaif_mlx.training.checkpoint import config_differences

E = math.e
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


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
    assert state == {"value": pytest.approx(0.10098 * 1.01), "target": 6.0, "horizon": 10000.0}
    # The coefficient comes back; target and horizon are the config's (a resume checks it is unchanged).
    other = AdaptiveKLController(1.0, target=2.0, horizon=40.0)
    other.load_state_dict(state)
    assert (other.value, other.target, other.horizon) == (ctl.value, 2.0, 40.0)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 10) == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_kl_reward_penalty():
    logp = np.array([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    ref_logp = np.array([[-2.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = kl_reward_penalty(logp, ref_logp, mask, coef=0.1)
    # row 0: sum k1 = (-1+2) + (-2+1) = 0; row 1: 0.5 + 0.5 = 1 (the third token is off the mask) -> 0.1
    np.testing.assert_allclose(out, [0.0, 0.1])


# ---- the placement / estimator pairs -------------------------------------------------------------------

MINIMAL = "model: {base_model: m}\ndata: {train_file: t.jsonl}\n"


def test_k1_in_the_loss_is_refused_at_load_in_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(MINIMAL + "rlaif:\n  kl_estimator: k1\n")  # kl_placement defaults to loss
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}:3: rlaif: ")
    assert "kl_estimator: k1 with kl_placement: loss" in message and "zero expected gradient" in message


PAIRS = [("loss", "k3"), ("reward", "k1"), ("reward", "k3")]


def test_the_config_accepts_exactly_three_pairs():
    found = []
    for placement in ("loss", "reward"):
        for estimator in ("k1", "k3"):
            try:
                RlaifConfig(kl_placement=placement, kl_estimator=estimator)
                found.append((placement, estimator))
            except ValueError:
                pass
    assert found == PAIRS


def rollout(rewards, logp, ref_logp, mask):
    """What ``AdvantageEstimator`` reads of a rollout."""
    return SimpleNamespace(
        rewards=np.asarray(rewards, dtype=np.float64),
        policy_logp=np.asarray(logp, dtype=np.float32),
        ref_logp=None if ref_logp is None else np.asarray(ref_logp, dtype=np.float32),
        sequences=SimpleNamespace(loss_mask=np.asarray(mask, dtype=np.float32)),
    )


def issue_rollout(rewards=(1.0, 1.0, 1.0, 1.0)):
    """The issue's all-pass group: 10 tokens a sample, per-token k1 about 0.02, sequence KLs
    0.193, 0.209, 0.187, 0.211 (k1 = logp - ref_logp = KL / 10 on every token)."""
    kl = np.array([0.193, 0.209, 0.187, 0.211])
    logp = np.full((4, 12), -1.0)
    mask = np.zeros((4, 12))
    mask[:, 2:] = 1.0  # two prompt positions, then the 10 completion tokens
    ref_logp = logp - (kl / 10)[:, None] * mask
    return rollout([list(rewards)], logp, ref_logp, mask), kl


@pytest.mark.parametrize("placement,estimator", PAIRS)
def test_a_step_with_an_all_pass_group(placement, estimator):
    """beta 0.05: the task advantage is 0; KL in the reward adds only -beta (KL_i - mean KL)."""
    rl = RlaifConfig(kl_placement=placement, kl_estimator=estimator, kl_penalty=0.05, scale_by_std=True)
    est = AdvantageEstimator(rl, TrainingConfig())
    data, kl = issue_rollout()
    advantages, weights, stats = est.advantages(data)
    assert stats["zero_variance_groups"] == 1
    # reward: -0.05 * ([0.193, 0.209, 0.187, 0.211] - 0.2) = [0.00035, -0.00045, 0.00065, -0.00055],
    # with k1 whatever the estimator; loss: the KL is the loss's, the advantages stay 0.
    want = [0.00035, -0.00045, 0.00065, -0.00055] if placement == "reward" else [0.0] * 4
    np.testing.assert_allclose(advantages, want, atol=1e-7)  # float32 log-probs, as a backend returns them
    assert weights.sum() == pytest.approx(1.0)  # 40 tokens at 1/40
    skipping = AdvantageEstimator(rl.model_copy(update={"skip_zero_variance_groups": True}), TrainingConfig())
    advantages, weights, _ = skipping.advantages(data)
    assert (advantages == 0).all() and (weights == 0).all()  # the whole group is dropped
    # The measured KL is the configured estimator's: k1 is the mean log-ratio, 0.8 / 40 = 0.02;
    # k3 = exp(-x) + x - 1 for each token's x = KL_i / 10.
    kl_token, coef = est.observe_kl(data)
    want_kl = 0.02 if estimator == "k1" else np.mean([math.exp(-x / 10) + x / 10 - 1 for x in kl])
    assert kl_token == pytest.approx(want_kl, rel=1e-5)
    assert coef == 0.05


@pytest.mark.parametrize("placement,estimator", PAIRS)
def test_a_step_with_signal_matches_the_reference(placement, estimator):
    rng = np.random.default_rng(3)
    rewards = [[0.0, 1.0, 0.5], [1.0, 0.0, None]]
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], float)
    logp = rng.uniform(-3.0, -0.1, size=mask.shape)
    ref_logp = logp + rng.normal(0.0, 0.2, size=mask.shape)
    rl = RlaifConfig(kl_placement=placement, kl_estimator=estimator, kl_penalty=0.1)
    est = AdvantageEstimator(rl, TrainingConfig())
    data = rollout([[np.nan if r is None else r for r in g] for g in rewards], logp, ref_logp, mask)
    advantages, _, _ = est.advantages(data)
    data_logp, data_ref = data.policy_logp.astype(float).tolist(), data.ref_logp.astype(float).tolist()
    sums = [ref.sequence_k1(lp, rf, m) for lp, rf, m in zip(data_logp, data_ref, mask.tolist(), strict=True)]
    penalty = [[0.1 * s for s in sums[0:3]], [0.1 * s for s in sums[3:6]]] if placement == "reward" else None
    want, _, _ = ref.advantages(
        rewards, baseline="group_mean", scale_by_std=True, whiten=False, skip=False, penalty=penalty
    )
    np.testing.assert_allclose(advantages, np.ravel(want), rtol=1e-5, atol=1e-6)
    kl_token, _ = est.observe_kl(data)
    assert kl_token == pytest.approx(ref.token_mean_kl(data_logp, data_ref, mask.tolist(), estimator=estimator))


# ---- the controller's horizon ------------------------------------------------------------------------


def _held_at_twice_the_target(est, target, steps, estimator):
    """Feeds ``steps`` steps whose measured per-token KL is 2 * target."""
    if estimator == "k1":
        x = 2 * target  # k1 = logp - ref_logp
    else:  # solve exp(-x) + x - 1 = 2 * target by Newton
        x = 1.0
        for _ in range(60):
            x -= (math.exp(-x) + x - 1 - 2 * target) / (1 - math.exp(-x))
    data = rollout([[1.0]], np.zeros((1, 4)), np.full((1, 4), -x), np.ones((1, 4)))
    for _ in range(steps):
        kl_token, _ = est.observe_kl(data)
    assert kl_token == pytest.approx(2 * target, rel=1e-5)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_kl_at_twice_the_target_doubles_beta_within_200_steps(path):
    """e = clip(2 - 1, -0.2, 0.2) = 0.2 each step, so beta grows by (1 + 0.2 / H) a step:
    laptop, cuda-server (H = 40, the default): 1.005 ** 200 = 2.71; quickstart (H = 31.25): 1.0064 ** 200 = 3.58.
    The old horizon of 10,000 samples at laptop's 16 samples a step: (1 + 0.2 * 16 / 10000) ** 200 = 1.066."""
    cfg = load_config(path)
    est = AdvantageEstimator(cfg.rlaif, cfg.training)
    assert cfg.rlaif.adaptive_kl
    horizon = kl_horizon_steps(cfg.rlaif, cfg.training)
    _held_at_twice_the_target(est, cfg.rlaif.target_kl, 200, cfg.rlaif.kl_estimator)
    assert est.kl_coef == pytest.approx(cfg.rlaif.kl_penalty * (1 + 0.2 / horizon) ** 200)
    assert est.kl_coef >= 2 * cfg.rlaif.kl_penalty
    assert {
        "laptop.yaml": 40.0,
        "cuda-server.yaml": 40.0,
        "quickstart.yaml": 31.25,
        "families.yaml": 40.0,
        "laptop-16gb.yaml": 40.0,
    }[path.name] == horizon


def test_the_old_horizon_key_keeps_its_meaning_in_samples(tmp_path):
    """``kl_horizon: 2000`` (samples) at 16 prompts x 4 samples is 31.25 steps: the same coefficient as before."""
    path = tmp_path / "old.yaml"
    old = {
        "model": {"base_model": "m"},
        "data": {"train_file": "t.jsonl"},
        "training": {"batch_size": 16},
        "rlaif": {"num_samples_per_prompt": 4, "kl_penalty": 0.02, "kl_horizon": 2000},
    }
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(path)
    assert (cfg.rlaif.kl_horizon, cfg.rlaif.kl_horizon_steps) == (2000, None)
    assert kl_horizon_steps(cfg.rlaif, cfg.training) == 31.25
    est = AdvantageEstimator(cfg.rlaif, cfg.training)
    _held_at_twice_the_target(est, cfg.rlaif.target_kl, 1, "k3")
    # the old update, over the step's 64 samples: 0.02 * (1 + 0.2 * 64 / 2000) = 0.020128
    assert est.kl_coef == pytest.approx(0.020128)
    # Its resolved config (as a checkpoint saves it) loads back the same.
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(saved) == cfg
    # A checkpoint of a run that left the horizon at its old default saved ``kl_horizon: 10000``: resuming it
    # with the same file is refused as a change (the default is now 40 steps) until the file says 10000 too.
    dumped = cfg.model_dump(mode="json")
    del dumped["rlaif"]["kl_horizon_steps"]
    dumped["rlaif"]["kl_horizon"] = 10000
    saved.write_text(yaml.safe_dump(dumped))
    unset = {**old, "rlaif": {k: v for k, v in old["rlaif"].items() if k != "kl_horizon"}}
    path.write_text(yaml.safe_dump(unset))
    current = load_config(path).model_dump(mode="json")
    assert config_differences(load_config(saved).model_dump(mode="json"), current) == [
        "rlaif.kl_horizon",
        "rlaif.kl_horizon_steps",
    ]
    path.write_text(yaml.safe_dump({**unset, "rlaif": {**unset["rlaif"], "kl_horizon": 10000}}))
    assert config_differences(load_config(saved).model_dump(mode="json"), load_config(path).model_dump()) == []
    # Both keys, or neither: one line naming the key to keep.
    old["rlaif"]["kl_horizon_steps"] = 40
    path.write_text(yaml.safe_dump(old))
    both = r"kl_horizon \(the old key, in samples\) and kl_horizon_steps are both set; keep kl_horizon_steps only"
    with pytest.raises(ConfigError, match=both):
        load_config(path)
    old["rlaif"] = {"kl_horizon_steps": None}
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="set the KL controller's horizon in steps"):
        load_config(path)
