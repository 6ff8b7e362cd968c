"""Tasks from JSONL files, and the prompt token ids the student sees.

One task per line: ``prompt`` (required), ``language`` (default ``python``) and
optional ``tests``, ``entry_point``, ``reference``, ``difficulty``, ``id``. A bad
line is an error naming ``file:line`` and the problem, or, with
``data.on_bad_line: skip``, skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
_FIELDS = {"prompt", "language", "tests", "entry_point", "reference", "difficulty", "id", "setup"}


class DataError(ValueError):
    """A data problem, phrased as one line naming ``file:line``."""


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    language: str = "python"
    tests: str | None = None
    entry_point: str | None = None
    reference: str | None = None
    difficulty: float | None = None
    setup: str | None = None  # code the prompt gives the solution (imports, helpers): run before it


@dataclass(frozen=True)
class TaskSet:
    tasks: list[Task]
    skipped_lines: int
    source: str
    problems: tuple[str, ...] = ()  # ``file:line: why`` of each skipped line

    def by_id(self) -> dict[str, Task]:
        return {t.id: t for t in self.tasks}


def resolve_data_path(name: str) -> Path:
    """``builtin:NAME`` is a file shipped in ``rlaif_mlx/datasets``; anything else is a path."""
    if name.startswith(BUILTIN_PREFIX):
        return Path(str(resources.files("rlaif_mlx.data") / "datasets" / name[len(BUILTIN_PREFIX) :]))
    return Path(name)


def load_tasks(name: str, *, on_bad_line: str = "error") -> TaskSet:
    """Reads a JSONL task file.

    Args:
        name: a path, or ``builtin:quickstart_train.jsonl`` for bundled data.
        on_bad_line: ``"error"`` raises on the first bad line; ``"skip"`` counts it.

    Returns:
        The tasks in file order, with the number of skipped lines.

    Raises:
        DataError: ``file:line: problem`` (or ``file: problem`` for the whole file).
    """
    path = resolve_data_path(name)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read task file ({exc.strerror})") from None
    tasks: list[Task] = []
    seen: set[str] = set()
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            task = _parse_line(line, default_id=f"{path.stem}-{number}")
            if task.id in seen:
                raise ValueError(f"duplicate id {task.id!r}")
        except ValueError as exc:
            if on_bad_line == "skip":
                problems.append(f"{path}:{number}: {exc}")
                continue
            raise DataError(f"{path}:{number}: {exc}") from None
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise DataError(f"{path}: no tasks found")
    return TaskSet(tasks=tasks, skipped_lines=len(problems), source=str(path), problems=tuple(problems))


def _parse_line(line: str, *, default_id: str) -> Task:
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' is required and must be a non-empty string")
    for key in ("language", "tests", "entry_point", "reference", "id", "setup"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise ValueError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    difficulty = obj.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, (int, float))):
        raise ValueError(f"'difficulty' must be a number, got {difficulty!r}")
    task = Task(
        id=obj.get("id") or default_id,
        prompt=prompt,
        language=(obj.get("language") or "python").lower(),
        tests=obj.get("tests") or None,
        entry_point=obj.get("entry_point") or None,
        reference=obj.get("reference") or None,
        difficulty=float(difficulty) if difficulty is not None else None,
        setup=obj.get("setup") or None,
    )
    problem = check_task(task)
    if problem:
        raise ValueError(problem)
    return task


def check_task(task: Task) -> str | None:
    """Why a task's tests cannot grade anything (they do not parse, hold no assert ...), or None."""
    from ..rewards.test_plan import check_tests

    if task.language not in ("python", "py", "python3") or not task.tests:
        return None
    reason = check_tests(task.tests, entry_point=task.entry_point)
    return f"tests: {reason}" if reason else None


def prompt_token_ids(
    tokenizer: Any, task: Task, *, use_chat_template: bool, system_prompt: str | None, max_prompt_tokens: int
) -> list[int]:
    """The token ids the student is prompted with.

    The chat template is applied when the tokenizer has one (and the config
    allows it); otherwise the raw prompt text is encoded.

    Raises:
        DataError: the prompt is longer than ``max_prompt_tokens``.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": task.prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        text = f"{system_prompt}\n\n{task.prompt}" if system_prompt else task.prompt
        ids = tokenizer.encode(text)
    if len(ids) > max_prompt_tokens:
        raise DataError(f"task {task.id}: prompt is {len(ids)} tokens, over data.max_prompt_tokens={max_prompt_tokens}")
    return list(ids)


def reference_completion_text(task: Task) -> str:
    """The answer a supervised warm-up teaches: the reference in a fenced block."""
    if task.reference is None:
        raise DataError(f"task {task.id}: has no reference solution")
    return f"```{task.language}\n{task.reference.rstrip()}\n```"
