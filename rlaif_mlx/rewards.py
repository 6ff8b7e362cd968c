"""The tiered reward pipeline: cheap checks, then unit tests, combined by weights.

Graders (``graders.py``) produce components per completion; this module turns
them into one scalar reward per sample, keyed by the sample's uid. A sample the
pipeline itself could not grade (the sandbox could not start, the grader
crashed) gets ``reward=None``: it is counted, shown and left out of the update,
never given a made-up score. A completion that fails its checks or tests is a
real 0, not an error of the pipeline.

Teachers (Claude, GPT, local judges) join as another component in a later
version; the seam is ``RewardPipeline.score``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import RewardConfig
from .data import Task
from .graders import GradeRequest, GradeResult, grade_many
from .sandbox import SandboxLimits

# Grader errors that mean "we could not judge", not "the completion failed".
_INFRASTRUCTURE_ERRORS = ("grader failed", "sandbox setup error", "sandbox supervisor killed")
# Reasons a component does not apply to a task (so it leaves the weighted mean).
_NOT_APPLICABLE = ("task has no tests", "tests are only run for")


@dataclass(frozen=True)
class RewardResult:
    """One sample's reward.

    Attributes:
        reward: the weighted combination in [0, 1], or None when it could not be scored.
        components: each component's value (``has_code``, ``parses``, ``tests``).
        error: what went wrong, for the logs (a failed test is reported here too).
    """

    reward: float | None
    components: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class RewardPipeline:
    """Scores completions for their tasks.

    Args:
        config: the ``rewards`` section (component weights, sandbox limits, workers).
    """

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.limits = SandboxLimits(memory_bytes=config.memory_limit_mb * 2**20)

    def score(self, items: list[tuple[str, Task, str]]) -> dict[str, RewardResult]:
        """Grades ``(uid, task, completion_text)`` items concurrently.

        Returns:
            uid -> result. Order of completion never matters: results are keyed.
        """
        requests = [
            GradeRequest(uid=uid, completion=text, task_tests=task.tests, entry_point=task.entry_point,
                         language=task.language)
            for uid, task, text in items
        ]
        graded = grade_many(requests, max_workers=self.config.max_workers, timeout_s=self.config.test_timeout_s,
                            limits=self.limits)
        return {uid: self.combine(graded[uid]) for uid, _, _ in items}

    def combine(self, grade: GradeResult) -> RewardResult:
        """Weighted mean of the components that apply to the task."""
        if grade.error and any(marker in grade.error for marker in _INFRASTRUCTURE_ERRORS):
            return RewardResult(None, dict(grade.components), grade.error)
        weights = dict(self.config.weights)
        if grade.tests_skipped and grade.tests_skipped.startswith(_NOT_APPLICABLE):
            weights.pop("tests", None)
        total_weight = sum(w for name, w in weights.items() if name in grade.components)
        if total_weight <= 0:
            return RewardResult(None, dict(grade.components), "no reward component applies to this task")
        reward = sum(w * grade.components[name] for name, w in weights.items() if name in grade.components)
        return RewardResult(reward / total_weight, dict(grade.components), grade.error)
