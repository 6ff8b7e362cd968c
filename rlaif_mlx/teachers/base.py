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
    """Tokens one API call consumed, as the API reported them.

    Attributes:
        input_tokens: every prompt token, whether the provider's prompt cache served it or not.
        output_tokens: the answer's tokens (reasoning included).
        cache_read_tokens: of ``input_tokens``, those read from the provider's prompt cache
            (Anthropic ``cache_read_input_tokens``, OpenAI ``prompt_tokens_details.cached_tokens``).
        cache_write_tokens: of ``input_tokens``, those written to it (Anthropic
            ``cache_creation_input_tokens``, OpenAI ``prompt_tokens_details.cache_write_tokens``).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class CacheMarks:
    """Which parts of a call's prompt the provider's prompt cache should keep.

    A prompt is laid out shared-first: the tools and the system prompt (the same in
    every call), then the shared part of the user message (the task and the reference:
    the same in every call about one task), then what only this call has.

    Attributes:
        system: mark the end of the system prompt (Anthropic ``cache_control``).
        prefix: mark the end of the shared part of the user message.
        key: a hint that routes calls sharing a prefix to the same cache (OpenAI ``prompt_cache_key``).
    """

    system: bool = False
    prefix: bool = False
    key: str | None = None


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
        usage: tokens this judgement's call cost; a call that judged several completions (a group,
            or identical ones) counts them once, on its first (zero on the others and when cached).
        cost_usd: what those tokens cost.
        latency_s: wall time of the API call (0 when cached).
        rationale: the teacher's short explanation, when it gave one.
        group_id: group mode: the call that judged it (its seeded permutation's id), else "".
        label: group mode: the completion's label in that call ("A", "B", ...).
        position: group mode: its place in the call's shuffled order (0 = shown first), else -1.
        group_size: group mode: how many completions the call judged side by side, else 0.
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
    group_id: str = ""
    label: str = ""
    position: int = -1
    group_size: int = 0


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

    async def complete(
        self,
        *,
        system: str,
        user: str,
        schema: dict[str, Any],
        max_tokens: int,
        prefix: str = "",
        cache: CacheMarks | None = None,
    ) -> RawAnswer:
        """Asks for an answer that fills ``schema`` (tool use / JSON schema where supported).

        The user message is ``prefix + user``: ``prefix`` is the part other calls share
        (``cache`` says whether to mark it, and the system prompt, for the prompt cache).
        """
        ...

    async def close(self) -> None:
        """Releases the HTTP connection pool."""
        ...
