"""What crosses the teacher layer: requests, raw answers, judgements, and the client protocol.

A *teacher* judges a student's completion for its task with a rubric and
returns a score in [0, 1]. Providers (``providers.py``) only move messages to
an API and back; the rubric (``rubric.py``) builds the messages and parses the
answers; the judge (``judge.py``) adds concurrency, the score cache
(``cache.py``) and the cost ledger (``cost.py``).

Framework- and SDK-free: importing this module imports neither anthropic nor openai.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

CRITERIA = ("correctness", "quality", "efficiency", "readability")
"""The rubric's criteria, each scored 0-10 by the teacher and normalised to [0, 1]."""


@dataclass(frozen=True)
class JudgeRequest:
    """One completion to judge.

    Attributes:
        uid: the sample's id; results are keyed by it, never by position.
        prompt: the task as the student saw it.
        completion: the student's text.
        language: the task's programming language.
        reference: a reference solution the rubric may compare against, or None.
    """

    uid: str
    prompt: str
    completion: str
    language: str = "python"
    reference: str | None = None


@dataclass(frozen=True)
class Usage:
    """Tokens one API call consumed, as the API reported them."""

    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class RawAnswer:
    """What a provider returned for one call, before parsing.

    Attributes:
        data: the structured output (tool input / JSON-schema object) when the
            model used it, else None.
        text: any plain text the model wrote (the tolerant parser's fallback).
        usage: token counts from the API's usage figures.
    """

    data: dict[str, Any] | None
    text: str
    usage: Usage


@dataclass(frozen=True)
class Judgement:
    """The teacher's verdict on one completion.

    Attributes:
        uid: the request's uid.
        score: weighted rubric score in [0, 1], or None when there is no verdict
            (the call failed for good or the answer could not be parsed); such a
            completion is left out of the update, never given a default score.
        criteria: each criterion in [0, 1].
        error: why there is no score (or None).
        cached: served from the score cache (no API call, no cost).
        usage: tokens this judgement cost (zero when cached).
        cost_usd: what those tokens cost.
        latency_s: wall time of the API call (0 when cached).
        rationale: the teacher's short explanation, when it gave one.
    """

    uid: str
    score: float | None
    criteria: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    cached: bool = False
    usage: Usage = Usage()
    cost_usd: float = 0.0
    latency_s: float = 0.0
    rationale: str = ""


class CallFailed(RuntimeError):
    """One API call failed for good: the API refused or broke, the connection or the clock gave out,
    or the answer was not what the API promises. The judge counts it; anything else is a bug and propagates.

    The provider's own exception is the ``__cause__``.

    Attributes:
        description: what went wrong in a line, for logs and metrics (never the key).
        fatal: retrying later cannot help (the key was refused, the model or endpoint does not exist).
    """

    def __init__(self, description: str, *, fatal: bool = False) -> None:
        super().__init__(description)
        self.description = description
        self.fatal = fatal


class TeacherClient(Protocol):
    """One provider's async client. Implementations: ``providers.py``.

    ``complete`` makes one API call (the SDK retries 429 / 5xx / timeouts /
    connection errors with its own backoff, up to ``max_retries``) and raises
    ``CallFailed`` when the call finally fails; any other exception is a bug.
    """

    provider: str  # "anthropic" | "openai" | "openai_compatible"
    model: str

    async def complete(self, *, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> RawAnswer:
        """Asks for an answer that fills ``schema`` (tool use / JSON schema where supported)."""
        ...

    async def close(self) -> None:
        """Releases the HTTP connection pool."""
        ...
