"""The bundled quickstart tasks: well-formed, and every reference passes its tests."""

from __future__ import annotations

import ast
import importlib.resources
import json
import subprocess
import sys

import pytest

FILES = ("quickstart_train.jsonl", "quickstart_eval.jsonl")
FIELDS = {
    "id": str,
    "prompt": str,
    "language": str,
    "entry_point": str,
    "tests": str,
    "reference": str,
    "difficulty": int,
}

# Runs every reference with its tests in one fresh interpreter, each task in its
# own namespace, one assert at a time; prints one JSON line per task.
RUNNER = """
import json, sys
for line in sys.stdin:
    task = json.loads(line)
    ns = {"__name__": "__main__"}
    exec(compile(task["reference"], "<reference>", "exec"), ns)
    results = []
    for stmt in task["statements"]:
        try:
            exec(compile(stmt, "<test>", "exec"), ns)
            results.append(None)
        except BaseException as e:
            results.append(repr(e))
    print(json.dumps({"id": task["id"], "results": results}))
"""


def _load(name: str) -> list[dict]:
    text = (importlib.resources.files("rlaif_mlx.data") / "datasets" / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[dict]]:
    return {name: _load(name) for name in FILES}


def _statements(tests: str) -> list[ast.stmt]:
    return ast.parse(tests).body


def test_sizes_and_spread(tasks):
    train, eval_ = tasks["quickstart_train.jsonl"], tasks["quickstart_eval.jsonl"]
    assert len(train) >= 48
    assert len(eval_) >= 12
    for rows in (train, eval_):
        assert {t["difficulty"] for t in rows} == {1, 2, 3}
    # Held-out tasks are new functions, not renamed training ones.
    assert not {t["entry_point"] for t in train} & {t["entry_point"] for t in eval_}


def test_schema(tasks):
    ids = []
    for rows in tasks.values():
        for task in rows:
            assert set(task) == set(FIELDS), task.get("id")
            for field, kind in FIELDS.items():
                assert isinstance(task[field], kind), (task["id"], field)
            assert task["language"] == "python"
            assert task["difficulty"] in (1, 2, 3)
            assert task["id"].startswith("qs-")
            assert f"`{task['entry_point']}(" in task["prompt"]
            ids.append(task["id"])
    assert len(ids) == len(set(ids)), "duplicate task ids"


def test_references_are_short_functions(tasks):
    for rows in tasks.values():
        for task in rows:
            tree = ast.parse(task["reference"])
            assert len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef), task["id"]
            func = tree.body[0]
            assert func.name == task["entry_point"]
            body_lines = task["reference"].rstrip("\n").splitlines()[1:]
            assert 1 <= len(body_lines) <= 4, task["id"]
            if task["difficulty"] == 1:
                assert len(body_lines) == 1, task["id"]
            assert task["reference"].endswith("\n")


def test_every_test_is_a_top_level_assert(tasks):
    for rows in tasks.values():
        for task in rows:
            statements = _statements(task["tests"])
            assert 3 <= len(statements) <= 5, task["id"]
            assert all(isinstance(s, ast.Assert) for s in statements), task["id"]
            # One assert per line, so a line count equals the assert count.
            assert len(task["tests"].strip().splitlines()) == len(statements), task["id"]


def test_references_pass_their_own_tests(tasks):
    jobs = []
    for rows in tasks.values():
        for task in rows:
            source = task["tests"]
            statements = [ast.get_source_segment(source, s) for s in _statements(source)]
            jobs.append({"id": task["id"], "reference": task["reference"], "statements": statements})
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER],
        input="".join(json.dumps(j) + "\n" for j in jobs),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in results] == [j["id"] for j in jobs]
    failures = {r["id"]: r["results"] for r in results if any(r["results"])}
    assert not failures, failures
