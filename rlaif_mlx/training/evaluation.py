"""Evaluation: sample the eval tasks, grade them, and summarise (mean reward, pass@k, teacher score).

``evaluate`` is one backend-agnostic function: the ``eval`` command calls it
for the base model and for a checkpoint, and the trainer can call it every
``eval.every_steps``. It samples with seeds fixed by ``config.seed`` (never
from the global RNG), so two evaluations of the same weights agree, a
checkpoint is compared with its base on the same random numbers, and an
evaluation in the middle of training leaves the training's RNG untouched.

pass@k is the unbiased estimator of Chen et al. (2021), "Evaluating Large
Language Models Trained on Code": from ``n`` samples of a task of which ``c``
pass every unit test, ``1 - C(n-c, k) / C(n, k)``, averaged over the tasks
that have tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..config import RunConfig
from ..data.tasks import Task
from ..rewards.code import normalize_language
from ..rewards.pipeline import RewardResult
from .settings import sampling_params, task_prompt_ids

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..rewards.pipeline import RewardPipeline

# Eval sampling seeds: an offset that keeps them apart from training's per-prompt seeds, within 63 bits.
_SEED_OFFSET = 0x5EED_0000_0000


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which equals
    ``1 - C(n-c, k) / C(n, k)`` without the huge binomials.

    Args:
        n: samples drawn for the task.
        c: how many of them pass.
        k: the budget of attempts.

    Returns:
        The probability that at least one of ``k`` samples drawn without
        replacement from the ``n`` passes: 1.0 when ``n - c < k``.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def has_tests(task: Task) -> bool:
    """Whether the graders run unit tests for the task (tests given, and in Python)."""
    return bool(task.tests and task.tests.strip()) and normalize_language(task.language) == "python"


def evaluate(
    backend: Backend,
    tasks: Sequence[Task],
    pipeline: RewardPipeline,
    config: RunConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Samples ``eval.num_samples`` completions per task, grades them and summarises.

    Sampling follows ``config.eval`` (temperature 0 is greedy; ``max_new_tokens``
    defaults to ``rlaif.max_new_tokens``; ``max_tasks`` keeps the first tasks)
    with the training's prompt format, stop strings and top-k/top-p/min-p.
    Prompts go in batches that hold no more sequences than a training step
    samples, and each batch is graded as soon as it is sampled.

    Args:
        backend: the model, with whatever weights it holds now.
        tasks: the eval tasks (ids unique).
        pipeline: the reward pipeline (graders, and the teacher when configured).
        config: the run config (``eval``, ``rlaif``, ``data``, ``training``, ``seed``).
        log: receives a progress line after each batch.

    Returns:
        ``eval/tasks``, ``eval/samples``, ``eval/unscored`` (samples that could
        not be scored; they count nowhere else), ``eval/reward_mean`` and
        ``eval/parses_mean`` over the scored samples (NaN when none was scored);
        where some task has tests: ``eval/tasks_with_tests``, ``eval/tests_mean``
        (mean fraction of asserts passed) and ``eval/pass@k`` for each k in
        ``eval.pass_k`` (a sample passes when all its tests pass; a task with
        fewer than k scored samples is left out); ``eval/teacher_mean`` when the
        teacher scored something.

    Raises:
        DataError: a prompt is too long (raised before anything is sampled).
        BudgetExceeded, TeacherUnavailable: from the teacher, as in training.
    """
    ev, rl = config.eval, config.rlaif
    tasks = list(tasks)[: ev.max_tasks] if ev.max_tasks else list(tasks)
    prompts = task_prompt_ids(backend.tokenizer, tasks, config.data)
    params = sampling_params(rl, temperature=ev.temperature, max_new_tokens=ev.max_new_tokens)
    per_batch = max(1, config.training.batch_size * rl.num_samples_per_prompt // ev.num_samples)
    results: dict[str, list[RewardResult]] = {t.id: [] for t in tasks}
    for number, start in enumerate(range(0, len(tasks), per_batch)):
        batch = tasks[start : start + per_batch]
        seed = _SEED_OFFSET + config.seed * 1_000_003 + number
        completions = backend.sample(
            [prompts[t.id] for t in batch], n=ev.num_samples, params=replace(params, seed=seed)
        )
        items = [(f"{batch[c.prompt_index].id}#{c.sample_index}", batch[c.prompt_index], c.text) for c in completions]
        scored = pipeline.score(items)
        for uid, task, _ in items:
            results[task.id].append(scored[uid])
        if log is not None:
            log(f"eval: {start + len(batch)}/{len(tasks)} tasks sampled and graded")
    return summarise(tasks, results, pass_k=ev.pass_k)


def summarise(
    tasks: Sequence[Task], results: dict[str, list[RewardResult]], *, pass_k: Sequence[int]
) -> dict[str, float]:
    """The ``evaluate`` metrics from each task's graded samples (see ``evaluate`` for the keys)."""
    scored = {t.id: [r for r in results[t.id] if r.reward is not None] for t in tasks}
    flat = [r for rs in scored.values() for r in rs]
    samples = sum(len(results[t.id]) for t in tasks)
    out: dict[str, float] = {
        "eval/tasks": len(tasks),
        "eval/samples": samples,
        "eval/unscored": samples - len(flat),
        "eval/reward_mean": _mean([r.reward for r in flat]),
        "eval/parses_mean": _mean([r.components.get("parses", 0.0) for r in flat]),
    }
    tested = [t for t in tasks if has_tests(t)]
    if tested:
        out["eval/tasks_with_tests"] = len(tested)
        out["eval/tests_mean"] = _mean([r.components.get("tests", 0.0) for t in tested for r in scored[t.id]])
        for k in pass_k:
            estimates = [
                pass_at_k(len(rs), sum(r.components.get("tests", 0.0) >= 1.0 for r in rs), k)
                for rs in (scored[t.id] for t in tested)
                if len(rs) >= k
            ]
            out[f"eval/pass@{k}"] = _mean(estimates)
    teacher = [r.components["teacher"] for r in flat if "teacher" in r.components]
    if teacher:
        out["eval/teacher_mean"] = _mean(teacher)
    return out


def format_eval_line(metrics: dict[str, float], *, step: int | None = None) -> str:
    """One line for a person: mean reward, pass@k, tests and teacher means, and what could not be scored."""
    where = f" at step {step}" if step is not None else ""
    parts = [f"reward {format_metric(metrics['eval/reward_mean'])}"]
    parts += [
        f"{key.removeprefix('eval/')} {format_metric(value)}"
        for key, value in metrics.items()
        if key.startswith("eval/pass@") or key in ("eval/tests_mean", "eval/teacher_mean")
    ]
    return (
        f"eval{where}: {'  '.join(parts)}  ({metrics['eval/tasks']} tasks, "
        f"{metrics['eval/unscored']} of {metrics['eval/samples']} samples unscored)"
    )


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def format_metric(value: float | None, *, signed: bool = False) -> str:
    """A metric for a person: 3 decimals (signed for a delta), ``-`` for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    return f"{value:+.3f}" if signed else f"{value:.3f}"
