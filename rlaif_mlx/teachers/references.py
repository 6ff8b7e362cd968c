"""Reference solutions written by a teacher: the prompts, the answer's schema and the parser.

A teacher can write a reference solution for a task that has none; the rubric
then shows it to the judge. Framework- and SDK-free.
"""

from __future__ import annotations

import re
from typing import Any

from .rubric import UnparseableAnswer, tagged

REFERENCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "the complete solution's source code, no fences"}},
    "required": ["code"],
    "additionalProperties": False,
}
"""JSON schema of a reference-solution answer (same strict-mode rules as ``SCORE_SCHEMA``)."""

_REFERENCE_SYSTEM = """\
You are an expert {language} programmer writing the reference solution for a \
programming task. Write a correct, idiomatic, efficient solution that handles \
edge cases and follows exactly the signature and behaviour the task asks for. \
Give the complete solution and nothing else: no tests, no example usage, no \
explanation. When asked for JSON, put the source code, without fences, in the \
"code" field; otherwise reply with a single fenced code block (```{fence})."""


def reference_messages(prompt: str, language: str) -> tuple[str, str]:
    """The system and user prompts that ask a teacher for a reference solution.

    Args:
        prompt: the task as the student sees it.
        language: the task's programming language.

    Returns:
        ``(system, user)``.
    """
    fence = language.strip().lower().replace(" ", "") or "text"
    system = _REFERENCE_SYSTEM.format(language=language, fence=fence)
    user = f"Language: {language}\n\n{tagged('task', prompt)}\n\nWrite the reference solution."
    return system, user


_FENCE_LINE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+#.\-]*)")


def parse_reference(text: str, language: str) -> str:
    """The code from a teacher's reference-solution answer.

    Takes the first fenced block labelled ``language`` (else the first fenced
    block; a fence never closed runs to the end), or the whole text when there
    is no fence.

    Args:
        text: the teacher's answer.
        language: the task's language.

    Returns:
        The code, stripped.

    Raises:
        UnparseableAnswer: the answer holds no code.
    """
    want = language.strip().lower()
    blocks: list[tuple[str, list[str]]] = []
    fence: str | None = None
    for line in (text or "").splitlines():
        match = _FENCE_LINE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                blocks.append((match.group(2).lower(), []))
        elif match and match.group(1).startswith(fence) and not match.group(2):
            fence = None
        else:
            blocks[-1][1].append(line)
    if blocks:
        chosen = next((lines for info, lines in blocks if info == want), blocks[0][1])
        code = "\n".join(chosen).strip()
    else:
        code = (text or "").strip()
    if not code:
        raise UnparseableAnswer(f"the teacher's reference answer holds no code: {(text or '')[:80]!r}")
    return code
