"""The shared policy loss on numpy, torch and mlx, checked against hand arithmetic; and the loss a
step trains on, for every combination of the objective's options that the config accepts."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import rl_reference as ref
from pydantic import ValidationError
from test_advantages import accepted  # the same enumeration of accepted config combinations

from rlaif_mlx.backends.base import StepStats
from rlaif_mlx.config import RlaifConfig, TrainingConfig
from rlaif_mlx.rl.objective import NUMPY_OPS, aggregation_weights, policy_loss
from rlaif_mlx.training.advantage_estimator import AdvantageEstimator
from rlaif_mlx.training.distributed import DistContext
from rlaif_mlx.training.policy_update import update_policy

E = math.e


def TorchOps():
    """The torch backend's own ArrayOps: the tests differentiate exactly what training does."""
    from rlaif_mlx.backends.torch_ops import TorchOps as _TorchOps

    return _TorchOps()


class MlxOps:
    """Minimal ArrayOps over mlx.core (the MLX backend will own the real one)."""

    def __init__(self):
        import mlx.core as mx

        self.m = mx

    def exp(self, x):
        return self.m.exp(x)

    def log(self, x):
        return self.m.log(x)

    def minimum(self, a, b):
        return self.m.minimum(a, b)

    def maximum(self, a, b):
        return self.m.maximum(a, b)

    def clip(self, x, lo, hi):
        return self.m.clip(x, lo, hi)

    def where(self, c, a, b):
        return self.m.where(c, a, b)

    def sum(self, x):
        return self.m.sum(x)

    def stop_gradient(self, x):
        return self.m.stop_gradient(x)

    def abs(self, x):
        return self.m.abs(x)


def np_loss(**kw):
    defaults = dict(old_logp=None, ref_logp=None, clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0)
    defaults.update(kw)
    loss, stats = policy_loss(NUMPY_OPS, **defaults)
    return float(loss), {k: float(v) for k, v in stats.items()}


MASK = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
LOGP = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])


def test_ratio_one_gives_minus_advantage_times_weights():
    w = aggregation_weights(MASK, aggregation="token_mean")  # 1/5 on each of 5 tokens
    loss, stats = np_loss(logp=LOGP, advantages=np.array([1.0, -2.0]), token_weights=w)
    # -(1 * 2/5) - (-2 * 3/5) = -0.4 + 1.2
    assert loss == pytest.approx(0.8)
    assert stats["pg_loss"] == pytest.approx(0.8)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clip_fraction"] == 0.0
    assert stats["weight_sum"] == pytest.approx(1.0)
    # [N, 1] advantages broadcast the same way
    loss2, _ = np_loss(logp=LOGP, advantages=np.array([[1.0], [-2.0]]), token_weights=w)
    assert loss2 == pytest.approx(0.8)


def test_clipped_cases_by_hand():
    logp = np.zeros((4, 1))
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1
    old = -np.log(np.array([[1.5], [1.5], [0.5], [0.5]]))
    adv = np.array([1.0, -1.0, 1.0, -1.0])
    w = np.full((4, 1), 0.25)
    loss, stats = np_loss(logp=logp, old_logp=old, advantages=adv, token_weights=w)
    # r=1.5, A=+1: -min(1.5, 1.2) = -1.2   (clipped)
    # r=1.5, A=-1: -min(-1.5, -1.2) = 1.5  (unclipped)
    # r=0.5, A=+1: -min(0.5, 0.8) = -0.5   (unclipped)
    # r=0.5, A=-1: -min(-0.5, -0.8) = 0.8  (clipped)
    assert loss == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.5 + 0.5 + 0.5) / 4)
    # clip-higher: eps_high 0.28 -> r=1.5, A=+1 gives -1.28
    loss_hi, _ = np_loss(logp=logp, old_logp=old, advantages=adv, token_weights=w, clip_eps_high=0.28)
    assert loss_hi == pytest.approx((-1.28 + 1.5 - 0.5 + 0.8) / 4)


def test_kl_term_added():
    logp = np.array([[-1.0, -2.0]])
    ref = np.array([[-2.0, -1.0]])
    w = np.array([[0.5, 0.5]])
    kl_mean = (math.exp(-1) + (E - 2)) / 2  # k3 at d=-1 and d=+1
    loss, stats = np_loss(logp=logp, ref_logp=ref, advantages=np.array([0.0]), token_weights=w, kl_coef=0.1)
    assert loss == pytest.approx(0.1 * kl_mean)
    assert stats["kl"] == pytest.approx(kl_mean)
    assert stats["pg_loss"] == 0.0
    # kl_coef 0: KL reported, not added
    loss0, stats0 = np_loss(logp=logp, ref_logp=ref, advantages=np.array([0.0]), token_weights=w, kl_coef=0.0)
    assert loss0 == 0.0 and stats0["kl"] == pytest.approx(kl_mean)
    # k1 in the loss: (-1+2) + (-2+1) = 0
    loss_k1, _ = np_loss(
        logp=logp, ref_logp=ref, advantages=np.array([0.0]), token_weights=w, kl_coef=0.1, kl_estimator="k1"
    )
    assert loss_k1 == pytest.approx(0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        np_loss(logp=logp, advantages=np.array([0.0]), token_weights=w, kl_coef=0.1)


def _junk_on_masked(x):
    y = x.copy()
    y[MASK == 0] = [-np.inf]
    return y


def test_masked_positions_do_not_matter_numpy():
    w = aggregation_weights(MASK, aggregation="sequence_mean")
    old = LOGP - 0.3
    ref = LOGP + 0.2
    kw = dict(advantages=np.array([0.7, -1.1]), token_weights=w, ref_logp=ref, kl_coef=0.05)
    base, stats = np_loss(logp=LOGP, old_logp=old, **kw)
    for junk in (1e4, -1e4, -np.inf):
        lp = LOGP.copy()
        lp[MASK == 0] = junk
        loss, stats2 = np_loss(logp=lp, old_logp=old, **kw)
        assert loss == pytest.approx(base) and stats2 == pytest.approx(stats)
        loss, _ = np_loss(logp=lp, old_logp=None, **kw)
        assert np.isfinite(loss)


def test_masked_positions_torch_zero_grad():
    torch = pytest.importorskip("torch")
    ops = TorchOps()
    w = torch.tensor(aggregation_weights(MASK, aggregation="token_mean"))
    ref = torch.tensor(LOGP + 0.2)
    adv = torch.tensor([0.7, -1.1])
    grads, losses = [], []
    for junk in (0.0, 1e4, -np.inf):
        lp_np = LOGP.copy()
        lp_np[MASK == 0] = junk
        lp = torch.tensor(lp_np, requires_grad=True)
        loss, _ = policy_loss(
            ops,
            logp=lp,
            old_logp=None,
            ref_logp=ref,
            advantages=adv,
            token_weights=w,
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            kl_coef=0.05,
        )
        loss.backward()
        losses.append(loss.item())
        grads.append(lp.grad.numpy())
    for g in grads:
        assert np.isfinite(g).all()
        assert (g[MASK == 0] == 0).all()
        np.testing.assert_allclose(g, grads[0])
    assert losses == pytest.approx([losses[0]] * 3)


def _expected_grad(logp, ref, adv, w, kl_coef):
    # ratio 1, unclipped: d/dlogp [-r A] = -A; d/dlogp k3 = 1 - exp(ref - logp)
    return w * (-adv[:, None] + kl_coef * (1.0 - np.exp(ref - logp)))


def test_gradient_torch_matches_hand():
    torch = pytest.importorskip("torch")
    ops = TorchOps()
    w_np = aggregation_weights(MASK, aggregation="token_mean")
    ref_np = LOGP + np.array([[0.2, -0.1, 0.0], [0.3, 0.0, -0.4]])
    adv_np = np.array([0.7, -1.1])
    for kl_coef in (0.0, 0.05):
        lp = torch.tensor(LOGP, requires_grad=True)
        loss, stats = policy_loss(
            ops,
            logp=lp,
            old_logp=None,
            ref_logp=torch.tensor(ref_np),
            advantages=torch.tensor(adv_np),
            token_weights=torch.tensor(w_np),
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            kl_coef=kl_coef,
        )
        loss.backward()
        np.testing.assert_allclose(lp.grad.numpy(), _expected_grad(LOGP, ref_np, adv_np, w_np, kl_coef), atol=1e-12)
        assert not stats["kl"].requires_grad
        np_val, _ = np_loss(logp=LOGP, ref_logp=ref_np, advantages=adv_np, token_weights=w_np, kl_coef=kl_coef)
        assert loss.item() == pytest.approx(np_val)
    # Clipped tokens get no policy-gradient signal: r=1.5, A=+1.
    lp = torch.zeros(1, 1, requires_grad=True)
    loss, _ = policy_loss(
        ops,
        logp=lp,
        old_logp=torch.full((1, 1), -math.log(1.5)),
        ref_logp=None,
        advantages=torch.tensor([1.0]),
        token_weights=torch.ones(1, 1, dtype=torch.float64),
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        kl_coef=0.0,
    )
    loss.backward()
    assert lp.grad.item() == 0.0


def test_gradient_mlx_matches_hand():
    mx = pytest.importorskip("mlx.core")
    ops = MlxOps()
    w_np = aggregation_weights(MASK, aggregation="token_mean")
    ref_np = LOGP + np.array([[0.2, -0.1, 0.0], [0.3, 0.0, -0.4]])
    adv_np = np.array([0.7, -1.1])
    f32 = lambda a: mx.array(np.asarray(a, dtype=np.float32))  # noqa: E731
    for kl_coef in (0.0, 0.05):

        def f(lp):
            loss, _ = policy_loss(
                ops,
                logp=lp,
                old_logp=None,
                ref_logp=f32(ref_np),
                advantages=f32(adv_np),
                token_weights=f32(w_np),
                clip_eps_low=0.2,
                clip_eps_high=0.2,
                kl_coef=kl_coef,
            )
            return loss

        loss, grad = mx.value_and_grad(f)(f32(LOGP))
        np.testing.assert_allclose(
            np.array(grad), _expected_grad(LOGP, ref_np, adv_np, w_np, kl_coef), rtol=1e-5, atol=1e-6
        )
        np_val, _ = np_loss(logp=LOGP, ref_logp=ref_np, advantages=adv_np, token_weights=w_np, kl_coef=kl_coef)
        assert loss.item() == pytest.approx(np_val, rel=1e-5)
    # -inf on masked positions: finite loss, zero gradient there.
    junk = _junk_on_masked(LOGP)
    loss, grad = mx.value_and_grad(f)(f32(junk))
    g = np.array(grad)
    assert np.isfinite(loss.item()) and np.isfinite(g).all() and (g[MASK == 0] == 0).all()


def test_aggregation_weights_by_hand():
    mask = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    tok = aggregation_weights(mask, aggregation="token_mean")
    np.testing.assert_allclose(tok, mask / 6)  # 6 tokens in the batch
    seq = aggregation_weights(mask, aggregation="sequence_mean")
    # row 0: 1/(2 tokens * 2 non-empty rows); row 1: 1/(4 * 2); row 2 empty
    np.testing.assert_allclose(seq, mask * np.array([[0.25], [0.125], [0.0]]))
    const = aggregation_weights(mask, aggregation="constant", max_tokens=4)
    np.testing.assert_allclose(const, mask / (3 * 4))
    assert tok.sum() == pytest.approx(1.0) and seq.sum() == pytest.approx(1.0)
    for agg in ("token_mean", "sequence_mean"):
        assert (aggregation_weights(np.zeros((2, 3)), aggregation=agg) == 0).all()
    with pytest.raises(ValueError, match="max_tokens"):
        aggregation_weights(mask, aggregation="constant")
    with pytest.raises(ValueError, match="Unknown aggregation"):
        aggregation_weights(mask, aggregation="median")


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_micro_batches_sum_to_full_loss(aggregation):
    rng = np.random.default_rng(0)
    n, t = 5, 6
    mask = (rng.random((n, t)) < 0.6).astype(np.float64)
    mask[3] = 0.0  # an empty row
    logp = rng.normal(size=(n, t)) - 2
    old = logp + rng.normal(size=(n, t)) * 0.5  # ratios far from 1: some clipping
    ref = logp + rng.normal(size=(n, t)) * 0.3
    adv = rng.normal(size=n)
    w = aggregation_weights(mask, aggregation=aggregation, max_tokens=t)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1)
    full, full_stats = policy_loss(
        NUMPY_OPS, logp=logp, old_logp=old, ref_logp=ref, advantages=adv, token_weights=w, **kw
    )
    parts = [slice(0, 2), slice(2, 4), slice(4, 5)]
    outs = [
        policy_loss(
            NUMPY_OPS, logp=logp[s], old_logp=old[s], ref_logp=ref[s], advantages=adv[s], token_weights=w[s], **kw
        )
        for s in parts
    ]
    assert sum(float(o[0]) for o in outs) == pytest.approx(float(full))
    assert sum(float(o[1]["pg_loss"]) for o in outs) == pytest.approx(float(full_stats["pg_loss"]))
    assert full_stats["clip_fraction"] > 0
    # Weighted-mean stats recombine exactly through weight_sum.
    for key in ("kl", "clip_fraction", "ratio_mean"):
        combined = sum(float(o[1][key] * o[1]["weight_sum"]) for o in outs) / float(full_stats["weight_sum"])
        assert combined == pytest.approx(float(full_stats[key]))


def test_why_k1_in_the_loss_is_refused():
    """One categorical step, policy softmax(theta) = [1/3, 2/3], reference [1/2, 1/2].

    grad_theta log pi(y) = e_y - pi. k1 = log pi(y) - log ref(y) has gradient e_y - pi, whose mean under
    pi is pi - pi = 0: as a loss term it adds noise and no pull. k3 = exp(d) - d - 1 (d = log ref - log pi)
    has gradient (1 - ref/pi)(e_y - pi), whose mean is sum_y (pi_y - ref_y)(e_y - pi) = pi - ref =
    [-1/6, 1/6]: descending it moves pi toward the reference.
    """
    pi, rho = np.array([1 / 3, 2 / 3]), np.array([0.5, 0.5])
    grad_logp = np.eye(2) - pi  # row y: e_y - pi
    mean_k1 = sum(pi[y] * grad_logp[y] for y in range(2))
    mean_k3 = sum(pi[y] * (1 - rho[y] / pi[y]) * grad_logp[y] for y in range(2))
    np.testing.assert_allclose(mean_k1, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(mean_k3, [-1 / 6, 1 / 6])
    with pytest.raises(ValidationError, match="kl_estimator: k1 with kl_placement: loss"):
        RlaifConfig(kl_estimator="k1", kl_placement="loss")


# ---- every combination the config accepts, through a step's wiring ----------------------------------------

KEYS = ("kl_placement", "kl_estimator", "baseline", "scale_by_std", "whiten_advantages", "skip_zero_variance_groups")


COMBOS = accepted(**dict.fromkeys(KEYS))  # every combination of the six keys the config accepts
# Three prompts, three samples: varied, flat (all pass), and one with an unscored sample.
REWARDS = [[0.0, 0.5, 1.0], [1.0, 1.0, 1.0], [0.25, None, 1.0]]
STEP_MASK = np.array([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 0]] * 3, dtype=np.float64)
STEP_LOGP = np.random.default_rng(11).uniform(-2.5, -0.2, size=STEP_MASK.shape)
STEP_REF = STEP_LOGP + np.random.default_rng(12).normal(0.0, 0.3, size=STEP_MASK.shape)
BETA = 0.1


class NumpyBackend:
    """A backend whose policy is fixed log-probs: ``train_step`` evaluates the shared loss in numpy."""

    def __init__(self, logp):
        self.logp = logp
        self.steps = []

    def train_step(self, batch, *, loss, learning_rate):
        value, stats = policy_loss(
            NUMPY_OPS,
            logp=self.logp,
            old_logp=batch.old_logp,
            ref_logp=batch.ref_logp,
            advantages=batch.advantages.astype(np.float64),
            token_weights=batch.token_weights.astype(np.float64),
            clip_eps_low=loss.clip_eps_low,
            clip_eps_high=loss.clip_eps_high,
            kl_coef=loss.kl_coef,
            kl_estimator=loss.kl_estimator,
        )
        self.steps.append((batch, loss))
        return StepStats(float(value), float(stats["pg_loss"]), float(stats["kl"]), 0.0, 1.0, 0.0, learning_rate)


def test_the_combinations_counted():
    # placement x estimator: 4, less k1 in the loss = 3; baseline x scale_by_std: 8, less none + scaling = 7;
    # whiten x skip: 4. 3 * 7 * 4 = 84.
    assert len(COMBOS) == 84


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_accepted_combination_trains_on_the_reference_loss(combo):
    rl = RlaifConfig(**combo, kl_penalty=BETA, num_samples_per_prompt=3)
    est = AdvantageEstimator(rl, TrainingConfig())
    logp, ref_logp = STEP_LOGP.astype(np.float32), STEP_REF.astype(np.float32)
    rollout = SimpleNamespace(
        rewards=np.array([[np.nan if r is None else r for r in g] for g in REWARDS]),
        policy_logp=logp,
        ref_logp=ref_logp,
        sequences=SimpleNamespace(loss_mask=STEP_MASK.astype(np.float32)),
    )
    advantages, weights, stats = est.advantages(rollout)
    backend = NumpyBackend(logp.astype(np.float64))
    out = update_policy(
        backend,
        rollout,
        advantages,
        weights,
        training=TrainingConfig(),
        rlaif=rl,
        kl_coef=est.kl_coef,
        learning_rate=1e-5,
        dist=DistContext(),
    )

    # The reference, from the same float32 log-probs a backend would return.
    lp, rf, mask = logp.astype(float).tolist(), ref_logp.astype(float).tolist(), STEP_MASK.tolist()
    in_reward = combo["kl_placement"] == "reward"
    sums = [ref.sequence_k1(a, b, m) for a, b, m in zip(lp, rf, mask, strict=True)]
    penalty = [[BETA * x for x in sums[i : i + 3]] for i in (0, 3, 6)] if in_reward else None
    want_adv, trains, flat = ref.advantages(
        REWARDS,
        baseline=combo["baseline"],
        scale_by_std=combo["scale_by_std"],
        whiten=combo["whiten_advantages"],
        skip=combo["skip_zero_variance_groups"],
        penalty=penalty,
    )
    want_loss = ref.token_mean_loss(
        want_adv, trains, lp, rf, mask, beta_loss=0.0 if in_reward else BETA, estimator=combo["kl_estimator"]
    )
    np.testing.assert_allclose(advantages, np.ravel(want_adv), rtol=1e-5, atol=1e-6)
    assert out.loss == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    assert stats["zero_variance_groups"] == flat == 1
    # What the backend was handed: the KL term only with the loss placement, with the configured estimator.
    batch, settings = backend.steps[0]
    assert len(backend.steps) == 1 and batch.old_logp is None
    assert (batch.ref_logp is None) == in_reward
    assert settings.kl_coef == (0.0 if in_reward else BETA) and settings.kl_estimator == combo["kl_estimator"]
    # Token weights: 1 / (tokens of the samples that train) on each of their tokens.
    train_rows = np.ravel(trains)
    np.testing.assert_allclose(weights, STEP_MASK * train_rows[:, None] / (STEP_MASK.sum(1) @ train_rows), rtol=1e-6)
