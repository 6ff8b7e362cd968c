"""Tasks: JSONL task files, HumanEval, the bundled datasets and the tiny local model.

``load_task_set`` is the front door: a task set by the name a config or a flag gives.
"""

from __future__ import annotations

from .tasks import TaskSet, load_tasks


def load_task_set(name: str, *, on_bad_line: str = "error") -> TaskSet:
    """A task set by name: ``humaneval`` (any case) is HumanEval's 164 problems, anything else a task file.

    Args:
        name: ``humaneval``, a path, or ``builtin:NAME``.
        on_bad_line: as for ``load_tasks``.

    Raises:
        DataError: as for ``load_tasks``.
    """
    if name.strip().lower() == "humaneval":
        from .humaneval import load_humaneval

        return load_humaneval()
    return load_tasks(name, on_bad_line=on_bad_line)
