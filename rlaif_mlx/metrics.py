"""Metric sinks. ``metrics.jsonl`` always: one JSON object per optimizer step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JsonlSink:
    """Appends one JSON object per call; flushed each time so a crash loses nothing."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # on resume, drop lines written after the checkpoint we resume from
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
