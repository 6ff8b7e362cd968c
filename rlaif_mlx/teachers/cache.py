"""The score cache: judgements and reference solutions in one SQLite file.

A key is the sha256 of everything that decides the teacher's answer (provider,
model, rubric version, prompt, completion, reference, weights), so a rerun or a
resumed run never pays twice for the same judgement, and changing any of them
asks again. Entries older than the TTL count as missing.

Several training processes on one machine may share the file (the default path
is per user, not per run): SQLite's WAL journal lets readers run alongside one
writer, and a busy timeout makes a writer wait its turn instead of failing with
"database is locked". Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BUSY_TIMEOUT_S = 30.0


class ScoreCacheError(RuntimeError):
    """The cache file cannot be used (not a SQLite database, unreadable, ...)."""


def _digest(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def judgement_key(
    *,
    provider: str,
    model: str,
    rubric_version: str,
    prompt: str,
    completion: str,
    reference: str | None,
    weights: dict[str, float],
) -> str:
    """The cache key of one judgement.

    Args:
        provider: "anthropic", "openai" or "openai_compatible".
        model: the teacher's model id.
        rubric_version: ``rubric.RUBRIC_VERSION``.
        prompt: the task.
        completion: the student's text.
        reference: the reference solution shown to the teacher, or None.
        weights: the rubric weights (they are in the prompt, so they change the answer).

    Returns:
        A sha256 hex digest.
    """
    return _digest(
        {
            "kind": "judgement",
            "provider": provider,
            "model": model,
            "rubric_version": rubric_version,
            "prompt": prompt,
            "completion": completion,
            "reference": reference,
            # floats, so {"quality": 1} and {"quality": 1.0} share a key
            "weights": {name: float(w) for name, w in weights.items()},
        }
    )


def reference_key(*, provider: str, model: str, rubric_version: str, prompt: str, language: str) -> str:
    """The cache key of a teacher-written reference solution (see ``judgement_key``)."""
    return _digest(
        {
            "kind": "reference",
            "provider": provider,
            "model": model,
            "rubric_version": rubric_version,
            "prompt": prompt,
            "language": language,
        }
    )


class ScoreCache:
    """A key -> JSON-object store in SQLite with a time to live.

    ``ScoreCache(None, ttl_s=...)`` is a cache that stores nothing, so callers
    need no branches when ``teacher.cache_path`` is null.

    One connection per cache, shared by the caller's threads under a lock: each
    call is a single short statement (microseconds), the judge calls from one
    event-loop thread, and one connection makes ``close`` exact. Other processes
    have their own connections; SQLite's file locks and the busy timeout order them.

    Args:
        path: the SQLite file (``~`` expanded, parent folders created), or None for no cache.
        ttl_s: entries older than this many seconds are ignored; None keeps them forever.
        clock: seconds since the epoch, for entries' timestamps and their age (tests pass their own).

    Raises:
        ScoreCacheError: the file exists but is not a usable SQLite database.
    """

    def __init__(self, path: str | Path | None, *, ttl_s: float | None, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser() if path is not None else None
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit (isolation_level=None): every statement is its own short
            # transaction, so no lock is held between calls.
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL is durable across process crashes in WAL mode; a power cut may
                # lose the last entries, which only costs a repeated API call.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS entries ("
                    "key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
                )
            except BaseException:
                conn.close()
                raise
        except (sqlite3.Error, OSError) as err:
            raise ScoreCacheError(
                f"teacher score cache {self.path} cannot be used ({err}); delete the file or set "
                "teacher.cache_path to another file (or null for no cache)"
            ) from None
        self._conn = conn

    @classmethod
    def disabled(cls) -> ScoreCache:
        """A cache that stores nothing."""
        return cls(None, ttl_s=None)

    @property
    def enabled(self) -> bool:
        """Whether entries are stored at all."""
        return self.path is not None

    def get(self, key: str) -> dict[str, Any] | None:
        """The value stored under ``key``, or None when missing, expired or unreadable."""
        if self.path is None:
            return None
        with self._lock:
            row = self._connection().execute("SELECT value, created FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        value, created = row
        if self.ttl_s is not None and self.clock() - created > self.ttl_s:
            return None
        try:
            decoded = json.loads(value)
        except ValueError:
            return None
        return decoded if isinstance(decoded, dict) else None

    def put(self, key: str, kind: str, value: dict[str, Any], *, created: float | None = None) -> None:
        """Stores ``value`` under ``key``, replacing what was there.

        Args:
            key: from ``judgement_key`` / ``reference_key``.
            kind: what the value is ("judgement", "reference"), for inspection.
            value: a JSON-serialisable dict.
            created: the entry's timestamp (seconds since the epoch); now by default.
        """
        if self.path is None:
            return
        encoded = json.dumps(value, sort_keys=True, ensure_ascii=False)
        stamp = self.clock() if created is None else float(created)
        with self._lock:
            self._connection().execute(
                "INSERT OR REPLACE INTO entries (key, kind, value, created) VALUES (?, ?, ?, ?)",
                (key, kind, encoded, stamp),
            )

    def stats(self) -> int:
        """How many entries the file holds (expired ones included)."""
        if self.path is None:
            return 0
        with self._lock:
            return int(self._connection().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        """Closes the connection; later calls raise ``ScoreCacheError`` (a disabled cache stays a no-op)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ScoreCacheError(f"teacher score cache {self.path} is closed")
        return self._conn

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
