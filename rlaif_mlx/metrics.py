"""Metric sinks. ``metrics.jsonl`` always: one JSON object per optimizer step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JsonlSink:
    """Appends one JSON object per call; flushed each time so a crash loses nothing."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None) -> None:
        """Opens ``path`` for appending.

        Args:
            path: the ``metrics.jsonl`` file.
            truncate_after_step: first drop the records of later steps (0 for a
                fresh run, the restored step for a resumed one); None keeps all.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop lines written after the checkpoint we resume from
            # (and a line torn by a crash mid-write, which has no step to keep).
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step_of(line: str) -> float:
    """A record's step (0 for a record without one); infinity for a blank or unreadable line."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    return record.get("step", 0) if isinstance(record, dict) else math.inf


def _plain(value: Any) -> Any:
    """JSON has no NaN: unmeasurable values become null rather than a fake number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` back (for tests, plots and resume)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
