"""The suspect flag: cheats are named, honest solutions are not, and the reward never reads it."""

from __future__ import annotations

import sys

import pytest
from test_reward_integrity import CHEATS, CORRECT, TASK

from rlaif_mlx.config import RewardConfig
from rlaif_mlx.data import load_task_set
from rlaif_mlx.rewards.pipeline import RewardPipeline
from rlaif_mlx.rewards.suspect import suspect_reasons

VALUE_ONLY = {"float nan"}  # returns a plain value: nothing in its code reaches for the grader


@pytest.mark.parametrize("name", sorted(set(CHEATS) - VALUE_ONLY))
def test_every_cheat_in_the_corpus_is_named(name):
    assert suspect_reasons(CHEATS[name]) != ()


def test_the_bundled_reference_solutions_are_not_flagged():
    flagged = {
        task.id: suspect_reasons(task.reference)
        for name in ("humaneval", "builtin:quickstart_train.jsonl", "builtin:quickstart_eval.jsonl")
        for task in load_task_set(name).tasks
        if suspect_reasons(task.reference)
    }
    assert flagged == {"HumanEval/160": ("runs code it builds",)}  # it evaluates the expression it builds


def test_named_reasons_are_specific():
    assert suspect_reasons("import sys\nf = sys._getframe(1)\n") == ("walks frames",)
    assert suspect_reasons("import builtins\nbuiltins.len = lambda x: 0\n") == ("reassigns a built-in",)
    assert suspect_reasons("class A:\n    def __eq__(self, o):\n        return True\n") == (
        "gives its objects their own comparison or truth",
    )
    assert suspect_reasons("import os as o\no._exit(0)\n") == ("exits the process",)
    assert suspect_reasons("with open('/work/tasks.jsonl') as f:\n    pass\n") == ("reads files outside its folder",)
    assert suspect_reasons("def add(a, b):\n    return a + b\n") == ()
    assert suspect_reasons("def (") == ()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the graders' sandbox here is Linux's")
def test_the_flag_travels_with_the_sample_and_never_changes_its_reward():
    pipeline = RewardPipeline(RewardConfig(weights={"parses": 0.1, "tests": 0.9}, test_timeout_s=5))
    flagged = "import gc\ngc.collect()\n" + CORRECT
    got = pipeline.score([("plain", TASK, CORRECT), ("flagged", TASK, flagged)])
    assert got["plain"].suspect == () and got["flagged"].suspect == ("scans the garbage collector",)
    assert got["plain"].reward == got["flagged"].reward == pytest.approx(1.0)
