"""The tiered reward pipeline: cheap checks, then unit tests, then the teacher, combined by weights.

Graders (``graders.py``) produce ``has_code``, ``parses`` and ``tests`` per
completion; the teacher (``teachers/judge.py``), when configured, adds
``teacher`` for the completions that pass its gate (``teacher.gate``), so
nobody pays to hear that code which does not parse is bad: a completion that
fails the gate gets ``teacher = 0`` without a call. This module turns the
components into one scalar reward per sample, keyed by the sample's uid.

A sample the pipeline could not grade (the grade's kind is ``infrastructure``:
the sandbox or the test driver could not run; or the teacher call failed or its
answer could not be parsed) gets ``reward=None``: it is counted, shown and left
out of the update, never given a made-up score. The kind is set by the trusted
side, so nothing a completion prints or does can make it unscored. A completion
that fails its checks or tests, crashes or times out is a real 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import RewardConfig
from ..data.tasks import Task
from .graders import NO_TESTS, UNSCORED_KINDS, GradeRequest, GradeResult, grade_many
from .sandbox import SandboxLimits

if TYPE_CHECKING:  # the teacher imports the SDKs; only runs with a teacher load it
    from ..teachers.base import Judgement
    from ..teachers.judge import Teacher


@dataclass(frozen=True)
class RewardResult:
    """One sample's reward.

    Attributes:
        reward: the weighted combination in [0, 1], or None when it could not be scored.
        components: each component's value (``has_code``, ``parses``, ``tests``).
        error: what went wrong, for the logs (a failed test is reported here too).
        kind: the grade's kind (``passed``, ``failed``, ``syntax_error`` ... see ``graders``).
        suspect: how the code reaches for the grading surface (shown, never scored).
    """

    reward: float | None
    components: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    kind: str | None = None
    suspect: tuple[str, ...] = ()


class RewardPipeline:
    """Scores completions for their tasks.

    Args:
        config: the ``rewards`` section (component weights, sandbox limits, workers).
        teacher: the AI judge, or None for the offline graders alone.
    """

    def __init__(self, config: RewardConfig, *, teacher: Teacher | None = None) -> None:
        self.config = config
        self.teacher = teacher
        self.limits = SandboxLimits(memory_bytes=config.memory_limit_mb * 2**20)
        self._written_references: dict[str, str | None] = {}  # task prompt -> the teacher's reference

    def score(self, items: list[tuple[str, Task, str]]) -> dict[str, RewardResult]:
        """Grades ``(uid, task, completion_text)`` items concurrently.

        Returns:
            uid -> result. Order of completion never matters: results are keyed.
        """
        requests = [
            GradeRequest(
                uid=uid,
                completion=text,
                task_tests=task.tests,
                entry_point=task.entry_point,
                language=task.language,
                prelude=task.setup or "",
            )
            for uid, task, text in items
        ]
        graded = grade_many(
            requests, max_workers=self.config.max_workers, timeout_s=self.config.test_timeout_s, limits=self.limits
        )
        judgements = self._judge(items, graded) if self.teacher is not None else {}
        return {uid: self.combine(graded[uid], judgements.get(uid)) for uid, _, _ in items}

    def metrics(self) -> dict[str, float]:
        """The teacher's numbers for the last ``score`` call (empty without a teacher)."""
        if self.teacher is None:
            return {}
        return self.teacher.last_batch.metrics(self.teacher.ledger)

    def _judge(self, items: list[tuple[str, Task, str]], graded: dict[str, GradeResult]) -> dict[str, Judgement]:
        """Asks the teacher about the completions that pass its gate."""
        from ..teachers.base import JudgeRequest

        config = self.teacher.config
        gated = [(uid, task, text) for uid, task, text in items if self.passes_gate(graded[uid], config.gate)]
        if config.write_reference:
            self._write_references([task for _, task, _ in gated])
        requests = [
            JudgeRequest(
                uid=uid,
                prompt=task.prompt,
                completion=text,
                language=task.language,
                reference=self._reference(task) if config.use_reference else None,
            )
            for uid, task, text in gated
        ]
        return self.teacher.judge(requests)

    def _write_references(self, tasks: list[Task]) -> None:
        missing = {t.prompt: t.language for t in tasks if not t.reference and t.prompt not in self._written_references}
        if missing:
            self._written_references.update(self.teacher.write_references(list(missing.items())))

    def _reference(self, task: Task) -> str | None:
        return task.reference or self._written_references.get(task.prompt)

    @staticmethod
    def passes_gate(grade: GradeResult, gate: str) -> bool:
        """Whether a graded completion is worth a teacher call.

        Tasks without tests pass the test gates (there is nothing to fail), and
        a completion the graders could not grade is never sent.
        """
        if grade.kind in UNSCORED_KINDS:
            return False
        no_tests = grade.kind == NO_TESTS
        if gate == "always":
            return True
        if gate == "parses":
            return grade.components.get("parses", 0.0) >= 1.0
        if gate == "any_test_passes":
            return grade.components.get("parses", 0.0) >= 1.0 and (no_tests or grade.components["tests"] > 0)
        if gate == "all_tests_pass":
            return grade.components.get("parses", 0.0) >= 1.0 and (no_tests or grade.components["tests"] >= 1.0)
        raise ValueError(f"unknown teacher.gate {gate!r}")

    def combine(self, grade: GradeResult, judgement: Judgement | None = None) -> RewardResult:
        """Weighted mean of the components that apply to the task.

        With a teacher: ``judgement`` None means the completion did not pass the
        gate (``teacher = 0``); a judgement without a score makes the whole
        reward None.
        """
        seen = {"kind": grade.kind, "suspect": grade.suspect}
        if grade.kind in UNSCORED_KINDS:
            return RewardResult(None, dict(grade.components), grade.error, **seen)
        components = dict(grade.components)
        weights = dict(self.config.weights)
        if self.teacher is None:
            weights.pop("teacher", None)
        elif judgement is None:
            components["teacher"] = 0.0
        elif judgement.score is None:
            return RewardResult(None, components, f"teacher: {judgement.error}", **seen)
        else:
            components["teacher"] = judgement.score
        if grade.kind == NO_TESTS:
            weights.pop("tests", None)
        total_weight = sum(w for name, w in weights.items() if name in components)
        if total_weight <= 0:
            return RewardResult(None, components, "no reward component applies to this task", **seen)
        reward = sum(w * components[name] for name, w in weights.items() if name in components)
        return RewardResult(reward / total_weight, components, grade.error, **seen)
