"""Why a run stops before its last step: a stop signal, or scoring that keeps failing.

A step is the smallest unit that can be saved exactly (mid-step state is
half-sampled, half-scored), so the first SIGINT / SIGTERM lets the step in
progress (an RL step, or a warm-up step) finish; the trainer then saves a
checkpoint and raises ``StopRequested``. A second signal stops at once, without a checkpoint.
Steps in which no sample could be scored train on nothing; several in a row
raise ``ScoringFailed`` instead of going on.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

MAX_UNSCORED_STEPS = 3
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ScoringFailed(RuntimeError):
    """Every sample of several steps in a row could not be scored."""


class StopRequested(RuntimeError):
    """SIGINT or SIGTERM arrived; the step in progress finished and a checkpoint was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Catches SIGINT / SIGTERM while a run is in its ``with`` block, and puts the old handlers back after.

    Signal handlers can only be set from the main thread; elsewhere nothing is caught.

    Args:
        log: prints one human line.
        current_step: the steps done so far (the signal's line names the step that finishes).
        doing: names the work in progress instead, e.g. ``"warm-up step 38 of 110"``.

    Attributes:
        received: the first signal's number, or None.
    """

    def __init__(
        self, *, log: Callable[[str], None], current_step: Callable[[], int], doing: Callable[[], str] | None = None
    ) -> None:
        self.log = log
        self.current_step = current_step
        self.doing = doing if doing is not None else lambda: f"step {current_step() + 1}"
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request) for signum in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _request(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.received = signum
        self.log(
            f"{signal.Signals(signum).name}: finishing {self.doing()}, then saving a checkpoint "
            "(send it again to stop at once, without one)"
        )

    def stop(self, what: str) -> StopRequested:
        """The exception that ends the run, saying ``what`` happened (e.g. ``after step 7: checkpoint saved``)."""
        signum = self.received or signal.SIGTERM  # another process of the job received it
        return StopRequested(f"{signal.Signals(signum).name} {what}", signum)


class UnscoredSteps:
    """Counts steps in a row in which no sample could be scored; ``count`` is part of the checkpoint."""

    def __init__(self, count: int = 0) -> None:
        self.count = count

    def check(self, rewards: np.ndarray, errors: list[str | None]) -> None:
        """Records one step's ``[B, G]`` rewards (NaN: unscored).

        Raises:
            ScoringFailed: ``MAX_UNSCORED_STEPS`` steps in a row scored nothing; names the last error.
        """
        if np.isfinite(rewards).any():
            self.count = 0
            return
        self.count += 1
        if self.count >= MAX_UNSCORED_STEPS:
            reasons = sorted({e for e in errors if e})
            raise ScoringFailed(
                f"no sample could be scored in {self.count} consecutive steps; last error: "
                f"{reasons[0] if reasons else 'unknown'}"
            )
