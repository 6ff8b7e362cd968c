"""Usage figures for the loopback server (``llm_server.py``) that behave as the real APIs' do.

Tokens are counted by a rough word-piece rule (``count``: a word of up to 8
letters, a number of up to 3 digits, a run of spaces, or one other character is
a token: about 3 to 4 characters per token on English and code, as the real
tokenizers give). Both API formats and both judging modes are counted by the
same rule, so ratios between them hold even though absolute counts are estimates.

``PromptCache`` keeps the prefixes the server has answered, per model, as the
providers do:

- Anthropic caches a prefix only at a block marked ``cache_control`` (or the
  last block, with the request's top-level ``cache_control``), and only when the
  tokens up to it reach the model's minimum. The request reads the longest
  marked prefix already cached; the rest up to its last qualifying mark is
  written; the remainder is plain input. The prompt runs tools (with the fixed
  tool-use system prompt Anthropic adds), system, messages.
- OpenAI caches every prompt of at least 1,024 tokens, in 128-token steps,
  with no marks; the response format's schema comes first.

A prefix is stored when its answer is sent, and looked up when a request
arrives: requests sent together all miss, as on the real APIs, where a cache
entry exists only once the first response has begun.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_TOKEN = re.compile(r"\s?[A-Za-z]{1,8}|\s?\d{1,3}|\s?[^\sA-Za-z\d]{1,2}|\s+")
# The system prompt Anthropic adds when a request has tools (Claude 4 models: 313 tokens when the tool is
# forced, 346 otherwise), counted before the tools.
ANTHROPIC_TOOL_PROMPT = {"tool": 313, "any": 313, "auto": 346, "none": 346}
OPENAI_STEP = 128


def tokens(text: str) -> list[str]:
    """The text cut into tokens by the rough rule above."""
    return _TOKEN.findall(text)


def count(text: str) -> int:
    """How many tokens ``text`` is, by the rough rule above."""
    return len(tokens(text))


def _segments_anthropic(request: dict[str, Any]) -> list[tuple[str, int, bool]]:
    """(text, extra tokens, marked) for each block of an Anthropic request, in cache order."""
    out: list[tuple[str, int, bool]] = []
    tools = request.get("tools") or []
    if tools:
        choice = (request.get("tool_choice") or {}).get("type", "auto")
        out.append(("", ANTHROPIC_TOOL_PROMPT.get(choice, 346), False))
        out += [(json.dumps(tool, sort_keys=True), 0, "cache_control" in tool) for tool in tools]
    system = request.get("system")
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
    out += [(str(block.get("text", "")), 0, "cache_control" in block) for block in blocks]
    for message in request.get("messages") or []:
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        out += [(f"{message.get('role')}: {part.get('text', '')}", 0, "cache_control" in part) for part in parts]
    if request.get("cache_control") and out:  # automatic caching: the last block
        out[-1] = (out[-1][0], out[-1][1], True)
    return out


class PromptCache:
    """The prefixes a provider would hold, and the usage a request gets from them.

    Args:
        anthropic_minimum: the smallest prefix Anthropic caches for the model under test, in tokens.
        openai_minimum: the smallest prompt OpenAI caches.
        enabled: False: nothing is ever cached (every token is plain input).
    """

    def __init__(self, *, anthropic_minimum: int = 1024, openai_minimum: int = 1024, enabled: bool = True) -> None:
        self.anthropic_minimum = anthropic_minimum
        self.openai_minimum = openai_minimum
        self.enabled = enabled
        self._stored: set[str] = set()

    def anthropic(self, request: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
        """The prompt side of an Anthropic ``usage``, and the prefixes to store once it is answered."""
        digest = hashlib.sha256(str(request.get("model")).encode())
        total, marks = 0, []
        for text, extra, marked in _segments_anthropic(request):
            digest.update(text.encode() + b"\x00")
            total += count(text) + extra
            if marked and self.enabled and total >= self.anthropic_minimum:
                marks.append((total, digest.hexdigest()))
        read = max((n for n, h in marks if h in self._stored), default=0)
        write = marks[-1][0] - read if marks and marks[-1][1] not in self._stored else 0
        usage = {"input_tokens": total - read - write, "cache_creation_input_tokens": write}
        return usage | {"cache_read_input_tokens": read}, [h for _, h in marks]

    def openai(self, request: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
        """The prompt side of an OpenAI ``usage`` (``prompt_tokens``, ``cached_tokens``), and the prefixes to store."""
        pieces: list[str] = []
        if request.get("response_format"):
            pieces += tokens(json.dumps(request["response_format"], sort_keys=True))
        for message in request.get("messages") or []:
            pieces += tokens(f"{message.get('role')}: {message.get('content')}")
        digest = hashlib.sha256(str(request.get("model")).encode())
        marks, done = [], 0
        if self.enabled:
            for end in range(self.openai_minimum, len(pieces) + 1, OPENAI_STEP):
                digest.update("\x00".join(pieces[done:end]).encode() + b"\x01")
                marks.append((end, digest.hexdigest()))
                done = end
        cached = max((n for n, h in marks if h in self._stored), default=0)
        return {"prompt_tokens": len(pieces), "cached_tokens": cached}, [h for _, h in marks]

    def store(self, prefixes: list[str]) -> None:
        """Keeps the prefixes of an answered request."""
        self._stored.update(prefixes)

    def clear(self) -> None:
        """Forgets every prefix (as the 5-minute cache does between runs)."""
        self._stored.clear()
