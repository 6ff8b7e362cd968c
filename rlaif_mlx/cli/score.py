"""``rlaif-mlx score``: grade existing completions with the configured reward pipeline.

Input: JSONL, one ``{"task_id": ..., "completion": ...}`` per line (other keys
are ignored). Output: JSONL, one line per input line in the same order, with
``task_id``, the final ``reward`` (null when it could not be scored), each
component and ``error`` (null when there was none). Useful on its own
(grading another model's outputs) and as a direct test of graders and teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .common import one_line_errors

if TYPE_CHECKING:
    from ..data.tasks import Task
    from ..rewards.pipeline import RewardPipeline

CHUNK = 64  # completions per pipeline call: bounded memory, progress between chunks


def add_parser(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser("score", help="grade existing completions with the configured graders and teacher")
    score.add_argument("--config", required=True, help="a run config (its rewards and teacher sections are used)")
    score.add_argument("--completions", required=True, help="JSONL: one {task_id, completion} per line")
    score.add_argument(
        "--tasks",
        help="JSONL tasks matched by id, or humaneval for HumanEval's problems "
        "(ids HumanEval/0 ...); default: the config's data.train_file",
    )
    score.add_argument("--out", help="JSONL output, one line per completion (default: stdout)")
    score.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..data import load_task_set
    from ..data.tasks import DataError
    from ..rewards.pipeline import RewardPipeline
    from ..teachers.cost import BudgetExceeded
    from ..teachers.judge import TeacherUnavailable
    from ..training.setup import create_teacher

    with one_line_errors(ConfigError, DataError):
        config = load_config(args.config, on_note=lambda note: print(note, file=sys.stderr))
        tasks = load_task_set(args.tasks or config.data.train_file, on_bad_line=config.data.on_bad_line).by_id()
        lines = read_completions(Path(args.completions), tasks)
    pipeline = RewardPipeline(config.rewards, teacher=create_teacher(config, source=args.config))
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        with one_line_errors(BudgetExceeded, TeacherUnavailable, prefix="stopped: "):
            summary = score_completions(lines, tasks, pipeline, out)
    finally:
        if out is not sys.stdout:
            out.close()
        if pipeline.teacher is not None:
            pipeline.teacher.close()
    spent = f", teacher spend ${pipeline.teacher.ledger.spent_usd:.4f}" if pipeline.teacher is not None else ""
    print(
        f"scored {summary['scored']} of {len(lines)} completions (mean reward {summary['reward_mean']:.3f}), "
        f"{summary['unscored']} could not be scored{spent}",
        file=sys.stderr,
    )
    return 0


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
    from ..data.tasks import DataError

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


def score_completions(
    lines: list[CompletionLine], tasks: dict[str, Task], pipeline: RewardPipeline, out: IO[str], *, progress=None
) -> dict[str, float]:
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
            record = {
                "task_id": c.task_id,
                "reward": result.reward,
                **result.components,
                "error": result.error,
                "grade": result.kind,
                "suspect": list(result.suspect),
            }
            out.write(json.dumps(record) + "\n")
        out.flush()
        if progress is not None:
            progress(min(start + CHUNK, len(lines)), len(lines))
    mean = sum(rewards) / len(rewards) if rewards else float("nan")
    return {"scored": len(rewards), "unscored": unscored, "reward_mean": mean}
