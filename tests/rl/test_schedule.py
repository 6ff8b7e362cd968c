"""Learning-rate schedule values at chosen steps, worked out by hand."""

import math

import pytest

from rlaif_mlx.rl.schedule import learning_rate_at


def lr(step, schedule, **kw):
    args = dict(base_lr=1.0, warmup_steps=4, total_steps=14, schedule=schedule)
    args.update(kw)
    return learning_rate_at(step, **args)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_starts_non_zero(schedule):
    # (step + 1) / warmup: 1/4, 2/4, 3/4, 4/4
    assert [lr(s, schedule) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr(4, schedule) == pytest.approx(1.0)  # first step after warmup: base_lr


def test_constant():
    assert lr(10, "constant") == 1.0
    assert lr(1000, "constant", min_lr_ratio=0.1) == 1.0


def test_linear():
    # progress = (step - 4) / (14 - 4)
    assert lr(9, "linear") == pytest.approx(0.5)
    assert lr(13, "linear") == pytest.approx(0.1)
    assert lr(14, "linear") == pytest.approx(0.0)
    assert lr(9, "linear", min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr(500, "linear", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_cosine():
    assert lr(9, "cosine") == pytest.approx(0.5)  # 0.5 * (1 + cos(pi/2))
    assert lr(6, "cosine") == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)))  # 0.904508...
    assert lr(14, "cosine", min_lr_ratio=0.2) == pytest.approx(0.2)
    assert lr(0, "cosine", warmup_steps=0, base_lr=3e-4) == pytest.approx(3e-4)


def test_errors():
    with pytest.raises(ValueError, match="Unknown LR schedule"):
        lr(0, "step")
    with pytest.raises(ValueError):
        lr(-1, "linear")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr(0, "linear", min_lr_ratio=2.0)
    # warmup longer than the run: no division by zero
    assert lr(20, "cosine", warmup_steps=20, total_steps=10) == pytest.approx(0.0)
