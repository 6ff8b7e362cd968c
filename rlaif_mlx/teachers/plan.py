"""What the judge sends: the calls for a batch, their prompts laid out shared-first, and the prompt-cache marks.

Pointwise mode makes one call per completion; group mode one call per prompt
(split above ``teacher.max_group``), its completions in a seeded shuffled order.
Every prompt starts with what many calls share (tools and system prompt, then
the task and the reference), so a provider's prompt cache can serve it:

- Anthropic caches only what a request marks (``cache_control``), and only a
  prefix at least as long as the model's minimum (``MINIMUM_TOKENS``); a write
  costs 1.25x the input price, a read a tenth or less. So a prefix is marked only
  when it is long enough and at least two calls of the batch share it: a prefix
  read by no later call would cost more than not caching it.
- OpenAI caches every prompt of 1,024 tokens or more by itself, in 128-token
  steps; ``prompt_cache_key`` routes the calls sharing a prefix to one cache.

Either way a cache entry exists only once the first response has begun, so the
calls sharing a marked prefix wait for the first of them (``Call.leads``): one
extra round trip per batch buys the reads. Marking a prefix shorter than the
minimum is free (the API ignores it), so the token estimate errs long.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .base import CacheMarks, JudgeRequest
from .group import GROUP_SCHEMA, LABELS, group_parts, shuffle, split
from .rubric import SCORE_SCHEMA, judge_parts

CHARS_PER_TOKEN = 3.0  # rough and on the short side, so that a long-enough prefix is never missed
# Smallest prefix each model caches, in tokens (first matching id prefix wins), from Anthropic's prompt-caching
# page and the model pages (checked 2026-11-25). The 5.5 generation's minimum is not published: 512, as Opus 5.
MINIMUM_TOKENS: tuple[tuple[str, int], ...] = (
    ("claude-opus-4-5", 4096),
    ("claude-opus-4-6", 4096),
    ("claude-haiku-4-5", 4096),
    ("claude-opus-4-7", 2048),
    ("claude-3-5-haiku", 2048),
    ("claude-3-haiku", 2048),
    ("claude-opus-5", 512),
    ("claude-sonnet-5-5", 512),
    ("claude-haiku-5-5", 512),
    ("claude-fable-5", 512),
    ("claude-mythos-5", 512),
    ("claude-", 1024),  # Sonnet 5, Opus 4.8, Sonnet 4.x, Opus 4 / 4.1, Claude 3.7
)
OPENAI_MINIMUM_TOKENS = 1024
ANTHROPIC_TOOL_PROMPT_TOKENS = 313  # the system prompt Anthropic adds for a forced tool, before everything we send


def minimum_tokens(provider: str, model: str) -> int | None:
    """The shortest prefix the provider's prompt cache keeps for ``model``; None where there is no such cache
    to aim for (an OpenAI-compatible local server)."""
    if provider == "anthropic":
        name = model.strip().lower()
        return next((n for prefix, n in MINIMUM_TOKENS if name.startswith(prefix)), 1024)
    return OPENAI_MINIMUM_TOKENS if provider == "openai" else None


@dataclass
class Call:
    """One API call of a batch.

    Attributes:
        keys: the cache keys of the completions it judges, in the order shown.
        requests: those completions' requests, same order.
        system, prefix, user: the prompt; the user message is ``prefix + user``.
        schema: the answer's JSON schema.
        max_tokens: longest answer.
        labels: group mode: one label per completion; "" in pointwise mode.
        group_id: group mode: the permutation's seed and the call's index in its group.
        cache: what to mark for the provider's prompt cache.
        leads: this call goes first; the others sharing its prefix wait for its answer.
        follows: the index (in the batch's calls) of the call this one waits for, or None.
    """

    keys: list[str]
    requests: list[JudgeRequest]
    system: str
    prefix: str
    user: str
    schema: dict[str, Any]
    max_tokens: int
    labels: str = ""
    group_id: str = ""
    cache: CacheMarks = field(default_factory=CacheMarks)
    leads: bool = False
    follows: int | None = None

    @property
    def chars(self) -> int:
        """The prompt's size in characters, for estimates."""
        return len(self.system) + len(self.prefix) + len(self.user)

    def seat(self, position: int) -> dict[str, Any]:
        """Where the completion at ``position`` sat: the permutation's record, as ``Judgement`` fields
        ({} in pointwise mode)."""
        if not self.labels:
            return {}
        label, size = self.labels[position], len(self.keys)
        return {"group_id": self.group_id, "label": label, "position": position, "group_size": size}


def pointwise_calls(todo: list[tuple[str, JudgeRequest]], *, weights: dict[str, float], max_tokens: int) -> list[Call]:
    """One call per completion."""
    calls = []
    for key, request in todo:
        system, prefix, user = judge_parts(request, weights=weights)
        calls.append(Call([key], [request], system, prefix, user, SCORE_SCHEMA, max_tokens))
    return calls


def group_calls(
    todo: list[tuple[str, JudgeRequest]], *, weights: dict[str, float], max_tokens: int, max_group: int
) -> list[Call]:
    """One call per task's completions (split above ``max_group``), shuffled by a seeded permutation.

    ``max_tokens`` is per completion: a call of n completions may answer n times as long.
    """
    tasks: dict[tuple[str, str | None, str], list[tuple[str, JudgeRequest]]] = defaultdict(list)
    for key, request in todo:
        tasks[(request.prompt, request.reference, request.language)].append((key, request))
    calls = []
    for members in tasks.values():
        order, seed = shuffle([key for key, _ in members])
        shown = [members[i] for i in order]
        start = 0
        for index, size in enumerate(split(len(shown), max_group)):
            chunk, start = shown[start : start + size], start + size
            labels = LABELS[:size]
            requests = [request for _, request in chunk]
            system, prefix, user = group_parts(requests, labels, weights=weights)
            calls.append(
                Call(
                    [key for key, _ in chunk],
                    requests,
                    system,
                    prefix,
                    user,
                    GROUP_SCHEMA,
                    max_tokens * size,
                    labels=labels,
                    group_id=f"{seed}/{index}",
                )
            )
    return calls


def mark_for_cache(calls: list[Call], *, provider: str, model: str, enabled: bool) -> list[Call]:
    """Sets each call's prompt-cache marks and who waits for whom (see the module's docstring).

    Args:
        calls: the batch's calls.
        provider: the teacher's provider.
        model: the teacher's model.
        enabled: ``teacher.prompt_cache``.

    Returns:
        ``calls``, leaders of each shared prefix first.
    """
    minimum = minimum_tokens(provider, model)
    if not enabled or minimum is None or len(calls) < 2:
        return calls
    sharing: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        sharing[_digest(call.system, json.dumps(call.schema), call.prefix)].append(call)
    extra = ANTHROPIC_TOOL_PROMPT_TOKENS if provider == "anthropic" else 0
    ordered = []
    for digest, group in sharing.items():
        head = (len(group[0].system) + len(json.dumps(group[0].schema))) / CHARS_PER_TOKEN + extra
        marks = CacheMarks(
            system=head >= minimum,
            prefix=len(group) >= 2 and head + len(group[0].prefix) / CHARS_PER_TOKEN >= minimum,
            key=digest[:32] if provider == "openai" else None,
        )
        for call in group:
            call.cache = marks
        if marks.prefix:
            group[0].leads = True
        ordered.append(group)
    out = [group[0] for group in ordered] + [call for group in ordered for call in group[1:]]
    index = {id(call): i for i, call in enumerate(out)}
    for group in ordered:
        for call in group[1:]:
            call.follows = index[id(group[0])] if group[0].leads else None
    return out


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()
