"""``rlaif-mlx score``: grade existing completions with the configured reward pipeline.

Input: JSONL, one ``{"task_id": ..., "completion": ...}`` per line (other keys
are ignored). Output: JSONL, one line per input line in the same order, with
``task_id``, the final ``reward`` (null when it could not be scored), each
component and ``error`` (null when there was none). Useful on its own
(grading another model's outputs) and as a direct test of graders and teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .data import DataError, Task
from .rewards import RewardPipeline

CHUNK = 64  # completions per pipeline call: bounded memory, progress between chunks


@dataclass(frozen=True)
class CompletionLine:
    line: int
    task_id: str
    completion: str


def read_completions(path: Path, tasks: dict[str, Task]) -> list[CompletionLine]:
    """Reads and checks the completions file.

    Raises:
        DataError: ``file:line: problem`` for a line that is not a JSON object, lacks
            ``task_id`` / ``completion``, or names a task that is not in the task set.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read completions ({exc.strerror})") from None
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object with task_id and completion")
        task_id, completion = item.get("task_id"), item.get("completion")
        if not isinstance(task_id, (str, int)) or not isinstance(completion, str):
            raise DataError(f"{where}: needs a string 'task_id' and a string 'completion'")
        if str(task_id) not in tasks:
            raise DataError(f"{where}: task_id {task_id!r} is not in the task set")
        out.append(CompletionLine(number, str(task_id), completion))
    return out


def score_completions(lines: list[CompletionLine], tasks: dict[str, Task], pipeline: RewardPipeline,
                      out: IO[str], *, progress=None) -> dict[str, float]:
    """Scores every line and writes one JSON line each to ``out``.

    Returns:
        Summary: ``scored``, ``unscored``, ``reward_mean`` over scored lines.
    """
    rewards: list[float] = []
    unscored = 0
    for start in range(0, len(lines), CHUNK):
        chunk = lines[start : start + CHUNK]
        items = [(f"line-{c.line}", tasks[c.task_id], c.completion) for c in chunk]
        results = pipeline.score(items)
        for c in chunk:
            result = results[f"line-{c.line}"]
            if result.reward is None:
                unscored += 1
            else:
                rewards.append(result.reward)
            record = {"task_id": c.task_id, "reward": result.reward, **result.components, "error": result.error}
            out.write(json.dumps(record) + "\n")
        out.flush()
        if progress is not None:
            progress(min(start + CHUNK, len(lines)), len(lines))
    mean = sum(rewards) / len(rewards) if rewards else float("nan")
    return {"scored": len(rewards), "unscored": unscored, "reward_mean": mean}
