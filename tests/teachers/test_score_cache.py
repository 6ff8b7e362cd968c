"""The SQLite score cache: keys, TTL, a disabled cache, corrupt files, and real multi-process writers."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rlaif_mlx.teachers.cache import ScoreCache, ScoreCacheError, judgement_key, reference_key

REPO = Path(__file__).resolve().parents[2]
BASE = dict(
    provider="anthropic",
    model="claude-haiku-4-5",
    rubric_version="1",
    prompt="Write add.",
    completion="def add(a, b): return a + b",
    reference=None,
    weights={"correctness": 0.6, "quality": 0.4},
)


def test_judgement_key_is_stable_and_depends_on_every_field():
    key = judgement_key(**BASE)
    assert len(key) == 64 and int(key, 16) >= 0
    assert judgement_key(**BASE) == key
    # Weight order and int-vs-float spelling do not matter ...
    assert judgement_key(**{**BASE, "weights": {"quality": 0.4, "correctness": 0.6}}) == key
    assert judgement_key(**{**BASE, "weights": {"correctness": 1, "quality": 0}}) == judgement_key(
        **{**BASE, "weights": {"correctness": 1.0, "quality": 0.0}}
    )
    # ... every field's value does.
    changes = {
        "provider": "openai",
        "model": "claude-sonnet-4-5",
        "rubric_version": "2",
        "prompt": "Write sub.",
        "completion": "def add(a, b): return b + a",
        "reference": "def add(a, b): return a + b",
        "weights": {"correctness": 0.5, "quality": 0.5},
    }
    keys = {judgement_key(**{**BASE, field: value}) for field, value in changes.items()}
    assert len(keys) == len(changes) and key not in keys
    assert judgement_key(**{**BASE, "reference": ""}) != key  # "" is not None


def test_reference_key_differs_from_judgement_key():
    ref = reference_key(provider="anthropic", model="m", rubric_version="1", prompt="p", language="python")
    assert ref == reference_key(provider="anthropic", model="m", rubric_version="1", prompt="p", language="python")
    assert ref != reference_key(provider="anthropic", model="m", rubric_version="1", prompt="p", language="rust")
    assert ref != judgement_key(
        provider="anthropic", model="m", rubric_version="1", prompt="p", completion="python", reference=None, weights={}
    )


def test_put_get_replace_and_persist(tmp_path):
    path = tmp_path / "nested" / "dir" / "cache.sqlite"
    with ScoreCache(path, ttl_s=None) as cache:
        assert cache.enabled and path.exists()
        assert cache.get("k") is None
        cache.put("k", "judgement", {"score": 0.5, "criteria": {"correctness": 0.5}, "rationale": "ünïcode"})
        assert cache.get("k") == {"score": 0.5, "criteria": {"correctness": 0.5}, "rationale": "ünïcode"}
        cache.put("k", "judgement", {"score": 0.9})
        assert cache.get("k") == {"score": 0.9}
        cache.put("r", "reference", {"code": "x = 1"})
        assert cache.stats() == 2
    with ScoreCache(str(path), ttl_s=None) as again:  # a new run reads what the last one stored
        assert again.get("k") == {"score": 0.9} and again.get("r") == {"code": "x = 1"}
    rows = sqlite3.connect(path).execute("SELECT key, kind FROM entries ORDER BY key").fetchall()
    assert rows == [("k", "judgement"), ("r", "reference")]
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with ScoreCache("~/cache/teacher.sqlite", ttl_s=None) as cache:
        assert cache.path == tmp_path / "cache" / "teacher.sqlite"
        assert cache.path.exists()


def test_ttl(tmp_path):
    now = [1_000_000.0]
    with ScoreCache(tmp_path / "c.sqlite", ttl_s=3600, clock=lambda: now[0]) as cache:
        cache.put("old", "judgement", {"score": 0.1}, created=now[0] - 7200)
        cache.put("new", "judgement", {"score": 0.2})
        assert cache.get("old") is None
        assert cache.get("new") == {"score": 0.2}
        assert cache.stats() == 2  # expired entries are ignored, not an error
        now[0] += 3600  # exactly the TTL old: still fresh
        assert cache.get("new") == {"score": 0.2}
        now[0] += 0.001  # past it
        assert cache.get("new") is None
    with ScoreCache(tmp_path / "c.sqlite", ttl_s=None) as forever:
        assert forever.get("old") == {"score": 0.1} and forever.get("new") == {"score": 0.2}


def test_disabled_cache_stores_nothing(tmp_path):
    for cache in (ScoreCache(None, ttl_s=10), ScoreCache.disabled()):
        assert not cache.enabled
        cache.put("k", "judgement", {"score": 1.0})
        assert cache.get("k") is None and cache.stats() == 0
        cache.close()
        cache.put("k", "judgement", {"score": 1.0})  # still a no-op after close
    assert list(tmp_path.iterdir()) == []


def test_closed_cache_raises(tmp_path):
    cache = ScoreCache(tmp_path / "c.sqlite", ttl_s=None)
    cache.close()
    with pytest.raises(ScoreCacheError, match="closed"):
        cache.get("k")


def test_garbage_file_gives_one_clear_line(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(ScoreCacheError) as info:
        ScoreCache(path, ttl_s=None)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "teacher.cache_path" in message


def test_threads_share_one_cache(tmp_path):
    errors: list[BaseException] = []
    with ScoreCache(tmp_path / "c.sqlite", ttl_s=None) as cache:

        def work(t: int) -> None:
            try:
                for i in range(100):
                    cache.put(f"t{t}-{i}", "judgement", {"i": i})
                    assert cache.get(f"t{t}-{i}") == {"i": i}
                    cache.get(f"t{(t + 1) % 8}-{i}")
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert cache.stats() == 800


_WORKER = textwrap.dedent("""
    import json, os, random, sys, threading, time
    from pathlib import Path
    from rlaif_mlx.teachers.cache import ScoreCache

    path, me, n_procs, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    cache = ScoreCache(path, ttl_s=3600)
    Path(f"{go}.ready{me}").touch()
    while not go.exists():
        time.sleep(0.005)
    seen, errors = 0, []

    def work(half):
        global seen
        rng = random.Random(me * 10 + half)
        try:
            for i in range(half, 200, 2):
                cache.put(f"p{me}-{i}", "judgement", {"proc": me, "i": i})
                other = rng.randrange(n_procs)
                if cache.get(f"p{other}-{rng.randrange(200)}") is not None:
                    seen += 1
        except BaseException as err:
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(h,)) for h in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    print(json.dumps({"errors": errors, "seen": seen}))
""")


def test_processes_write_and_read_one_file_concurrently(tmp_path):
    path, go, n_procs = tmp_path / "shared.sqlite", tmp_path / "go", 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path), str(me), str(n_procs), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me in range(n_procs)
    ]
    # Release all writers at once, after each has opened the (fresh) file.
    deadline = time.time() + 30
    while not all(Path(f"{go}.ready{me}").exists() for me in range(n_procs)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [
            p.communicate() for p in procs if p.poll() is not None
        ]
        time.sleep(0.01)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "locked" not in err.lower(), err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["errors"] == [] for r in results), results
    with ScoreCache(path, ttl_s=None) as cache:
        assert cache.stats() == n_procs * 200
        for me in range(n_procs):
            for i in range(200):
                assert cache.get(f"p{me}-{i}") == {"proc": me, "i": i}
