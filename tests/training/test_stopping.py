"""Early stops: a stop signal finishes the step and saves; scoring that keeps failing ends the run."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from rlaif_mlx.training.stopping import MAX_UNSCORED_STEPS, ScoringFailed, StopRequested, StopSignals, UnscoredSteps


def test_a_first_signal_is_noted_a_second_stops_at_once_and_the_old_handlers_come_back():
    lines: list[str] = []
    signals = StopSignals(log=lines.append, current_step=lambda: 4)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with signals:
        signal.raise_signal(signal.SIGTERM)  # the handler runs before raise_signal returns
        assert signals.received == signal.SIGTERM
        assert lines == [
            "SIGTERM: finishing step 5, then saving a checkpoint (send it again to stop at once, without one)"
        ]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    stop = signals.stop("after step 5: checkpoint saved")
    assert isinstance(stop, StopRequested) and stop.signum == signal.SIGTERM
    assert str(stop) == "SIGTERM after step 5: checkpoint saved"


def test_a_stop_another_process_received_reads_as_sigterm():
    signals = StopSignals(log=print, current_step=lambda: 0)
    with signals:
        pass
    assert signals.received is None
    assert signals.stop("during the warm-up: nothing saved").signum == signal.SIGTERM


def test_steps_in_a_row_that_score_nothing_stop_the_run_and_one_scored_sample_resets_the_count():
    nothing = np.full((2, 3), np.nan)
    streak = UnscoredSteps()
    streak.check(nothing, ["sandbox error", None])
    streak.check(np.array([[np.nan, 0.5, np.nan]]), [None])
    assert streak.count == 0
    for _ in range(MAX_UNSCORED_STEPS - 1):
        streak.check(nothing, ["sandbox error"])
    assert streak.count == MAX_UNSCORED_STEPS - 1
    with pytest.raises(ScoringFailed, match=r"in 3 consecutive steps; last error: a timeout$"):
        streak.check(nothing, ["b crash", None, "a timeout"])
    resumed = UnscoredSteps(2)  # a checkpoint's count carries on
    with pytest.raises(ScoringFailed, match="last error: unknown"):
        resumed.check(nothing, [None])
