"""Task files: good lines load, bad lines name file:line, chat templates apply."""

import json

import pytest

from rlaif_mlx.data.tasks import DataError, Task, load_tasks, prompt_token_ids, reference_completion_text


def write_lines(tmp_path, lines):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_fields_and_defaults(tmp_path):
    path = write_lines(
        tmp_path,
        [
            json.dumps({"prompt": "add", "tests": "assert f() == 1", "entry_point": "f", "difficulty": 2, "id": "a"}),
            "",
            json.dumps({"prompt": "sub", "language": "Rust"}),
        ],
    )
    ts = load_tasks(str(path))
    assert [t.id for t in ts.tasks] == ["a", "tasks-3"]
    assert ts.tasks[0].difficulty == 2.0 and ts.tasks[0].language == "python"
    assert ts.tasks[1].language == "rust" and ts.tasks[1].tests is None


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"language": "python"}), "'prompt' is required"),
        (json.dumps({"prompt": "x", "tests": 3}), "'tests' must be a string"),
        (json.dumps({"prompt": "x", "difficulty": "hard"}), "'difficulty' must be a number"),
        (json.dumps({"prompt": "x", "promt": "y"}), "unknown field"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path, [json.dumps({"prompt": "ok"}), line])
    with pytest.raises(DataError) as exc:
        load_tasks(str(path))
    assert str(exc.value).startswith(f"{path}:2: ")
    assert problem in str(exc.value)


def test_skip_mode_counts_bad_lines(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": "ok"}), "{bad", json.dumps({"id": "x"})])
    ts = load_tasks(str(path), on_bad_line="skip")
    assert len(ts.tasks) == 1 and ts.skipped_lines == 2


def test_duplicate_ids_are_errors(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": "a", "id": "x"}), json.dumps({"prompt": "b", "id": "x"})])
    with pytest.raises(DataError, match=r":2: duplicate id 'x'"):
        load_tasks(str(path))


def test_builtin_quickstart_data_loads():
    ts = load_tasks("builtin:quickstart_train.jsonl")
    assert len(ts.tasks) >= 40
    assert all(t.tests and t.reference for t in ts.tasks)


def test_chat_template_applied_when_present(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    task = Task(id="t", prompt="Write add(a, b).")
    with_template = prompt_token_ids(
        tok, task, use_chat_template=True, system_prompt="Be brief.", max_prompt_tokens=512
    )
    text = tok.decode(with_template)
    assert "Write add(a, b)." in text and "Be brief." in text and text.rstrip().endswith("assistant")
    plain = prompt_token_ids(tok, task, use_chat_template=False, system_prompt=None, max_prompt_tokens=512)
    assert tok.decode(plain) == "Write add(a, b)."
    with pytest.raises(DataError, match="over data.max_prompt_tokens=8"):
        prompt_token_ids(tok, task, use_chat_template=True, system_prompt=None, max_prompt_tokens=8)


def test_reference_completion_is_fenced():
    task = Task(id="t", prompt="p", reference="def f():\n    return 1\n\n")
    assert reference_completion_text(task) == "```python\ndef f():\n    return 1\n```"


# ---- tests that cannot grade anything are refused when the tasks load ------------------------


@pytest.mark.parametrize(
    ("task", "problem"),
    [
        ({"prompt": "p", "entry_point": "f", "tests": "assert f(1 =="}, "tests: tests do not parse"),
        ({"prompt": "p", "entry_point": "f", "tests": "x = f(1)\nprint(x)"}, "tests: tests contain no assert"),
        ({"prompt": "p", "tests": "def check(candidate):\n    assert candidate(1) == 1\n"}, "no entry_point"),
        ({"prompt": "p", "entry_point": "f; g", "tests": "assert f(1) == 1"}, "is not a Python name"),
    ],
    ids=["does-not-parse", "no-assert", "check-without-entry-point", "entry-point-not-a-name"],
)
def test_tests_that_cannot_grade_are_a_file_line_error(tmp_path, task, problem):
    path = write_lines(tmp_path, [json.dumps({"prompt": "ok", "tests": "assert 1 == 1"}), json.dumps(task)])
    with pytest.raises(DataError) as exc:
        load_tasks(str(path))
    assert str(exc.value).startswith(f"{path}:2: ") and problem in str(exc.value)
    skipped = load_tasks(str(path), on_bad_line="skip")
    assert len(skipped.tasks) == 1 and skipped.skipped_lines == 1
    assert skipped.problems[0].startswith(f"{path}:2: ") and problem in skipped.problems[0]


def test_tests_in_other_languages_are_not_parsed_as_python(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": "p", "language": "rust", "tests": "assert_eq!(f(1), 1);"})])
    assert load_tasks(str(path)).tasks[0].tests == "assert_eq!(f(1), 1);"
