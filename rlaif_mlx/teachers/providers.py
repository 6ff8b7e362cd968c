"""Provider clients: one API call through the official async SDKs, and what went wrong in a line.

``AnthropicClient`` asks for the scores through one forced tool (Messages API);
``OpenAIClient`` through a strict JSON schema (Chat Completions), also for
OpenAI-compatible local servers (``base_url``), which may not support the
schema: then it falls back to plain JSON text once and remembers. Retries,
backoff (``Retry-After`` honoured) and timeouts are the SDKs' own.

A call that fails for good raises ``base.CallFailed`` (its cause: the SDK's
``APIError``, a ``MalformedResponse`` or a timeout; described by ``failures.py``),
which the judge counts; any other exception is a bug in our code or the SDK's
and propagates.

Prompts arrive shared-first (``prefix`` then ``user``): Anthropic gets the
prefix as its own text block and ``cache_control`` where the judge marked it;
OpenAI caches prefixes by itself and gets a ``prompt_cache_key``. The usage
returned counts every prompt token, with the cache's reads and writes apart.

API keys are read from the environment by ``create_client`` and handed straight
to the SDK: they are never kept on our objects, logged, or put in our errors.
The SDKs are imported when a client is built, not when this module is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable
from typing import Any, TypeVar

from rlaif_mlx.config import TeacherConfig
from rlaif_mlx.teachers.base import CacheMarks, CallFailed, RawAnswer, TeacherClient, Usage
from rlaif_mlx.teachers.failures import TIMEOUTS as _TIMEOUTS
from rlaif_mlx.teachers.failures import MalformedResponse, MissingApiKey, describe_error, is_fatal

__all__ = [
    "AnthropicClient",
    "MalformedResponse",
    "MissingApiKey",
    "OpenAIClient",
    "create_client",
    "describe_error",
    "is_fatal",
]

log = logging.getLogger(__name__)

TOOL_NAME = "submit_scores"
_EPHEMERAL = {"type": "ephemeral"}  # Anthropic's 5-minute prompt cache
SCHEMA_NAME = "scores"
DEFAULT_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "openai_compatible": None}
LOCAL_PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, but the OpenAI SDK requires one
# OpenAI reasoning models reject `temperature` (only the default is allowed).
_NO_TEMPERATURE_PREFIXES = ("gpt-5", "o1", "o3", "o4")


_T = TypeVar("_T")


async def _failures_as_call_failed(call: Awaitable[_T], expected: tuple[type[BaseException], ...]) -> _T:
    """Awaits ``call``; what a failed call raises (``expected``) becomes ``CallFailed``, the rest propagates."""
    try:
        return await call
    except expected as exc:
        raise CallFailed(describe_error(exc), fatal=is_fatal(exc)) from exc


# Claude models that answer 400 to a forced tool choice (Anthropic's Sonnet 5.5 migration guide); they
# give the scores as JSON text constrained by the schema (structured outputs, ``output_config.format``).
STRUCTURED_OUTPUT_MODELS = ("claude-sonnet-5-5", "claude-opus-5-5")


class AnthropicClient:
    """Claude through the Messages API, scores via one forced tool.

    Args:
        model: e.g. ``claude-sonnet-4-5``.
        api_key: handed to the SDK client; not in our attributes or repr.
        base_url: another endpoint (a proxy, the test server), or None for the SDK's default.
        timeout_s: per-attempt timeout.
        max_retries: the SDK's retries of 408/409/429/5xx, timeouts and connection errors.
        temperature: accepted for symmetry and not sent: SDK 2.x speaks API version
            2026-10-21, which rejects sampling parameters (temperature, top_p, top_k).
    """

    provider = "anthropic"

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        temperature: float = 0.0,
    ) -> None:
        import anthropic

        self.model = model
        self.base_url = base_url
        self.temperature = temperature
        self._sdk = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries
        )
        # APIError covers the SDK's status, connection and timeout errors.
        self._call_errors = (anthropic.APIError, MalformedResponse, *_TIMEOUTS)

    def __repr__(self) -> str:
        return f"AnthropicClient(model={self.model!r}, base_url={self.base_url!r})"

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
        """One Messages call that must answer through the ``submit_scores`` tool.

        Args:
            system: the system prompt.
            user: the user message (after ``prefix``).
            schema: JSON schema of the tool's input.
            max_tokens: longest answer.
            prefix: the start of the user message that other calls share, sent as its own text block.
            cache: ``cache_control`` marks on the system prompt and on ``prefix``.

        Returns:
            The tool input as ``data`` (None when the model wrote only text), the
            text blocks joined, and the usage the API reported (cache reads and writes included).

        Raises:
            CallFailed: the call failed after the SDK's retries (``anthropic.APIError``),
                or a 200 whose body is not a Messages answer (``MalformedResponse``).
        """
        marks = cache or CacheMarks()
        call = self._complete(system, prefix, user, schema, max_tokens, marks)
        return await _failures_as_call_failed(call, self._call_errors)

    async def _complete(
        self, system: str, prefix: str, user: str, schema: dict[str, Any], max_tokens: int, marks: CacheMarks
    ) -> RawAnswer:
        tool = {"name": TOOL_NAME, "description": "Submit the rubric scores.", "input_schema": schema}
        system_param: Any = [{"type": "text", "text": system, "cache_control": _EPHEMERAL}] if marks.system else system
        content: Any = user
        if prefix:
            shared = {"type": "text", "text": prefix} | ({"cache_control": _EPHEMERAL} if marks.prefix else {})
            content = [shared, {"type": "text", "text": user}]
        if self.model.startswith(STRUCTURED_OUTPUT_MODELS):
            # These models refuse a forced tool (400): the answer comes as JSON text under the schema instead.
            answer_format: dict[str, Any] = {
                "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}}
            }
        else:
            answer_format = {"tools": [tool], "tool_choice": {"type": "tool", "name": TOOL_NAME}}
        try:
            message = await self._sdk.messages.create(
                model=self.model,
                max_tokens=max_tokens,
                system=system_param,
                messages=[{"role": "user", "content": content}],
                **answer_format,
            )
        except json.JSONDecodeError as exc:
            raise MalformedResponse(f"response body is not JSON ({exc.msg})") from None
        if not hasattr(message, "content"):  # the SDK returns a non-JSON body as a str
            raise MalformedResponse("response body is not JSON")
        data, texts = None, []
        for block in message.content:
            if block.type == "tool_use" and data is None and isinstance(block.input, dict):
                data = dict(block.input)
            elif block.type == "text":
                texts.append(block.text)
        if data is None and "output_config" in answer_format:
            data = _json_object("".join(texts))
        usage = message.usage
        # Anthropic's input_tokens leaves out the prompt-cache reads and writes; ours counts every prompt token.
        read = getattr(usage, "cache_read_input_tokens", 0) or 0
        write = getattr(usage, "cache_creation_input_tokens", 0) or 0
        return RawAnswer(
            data=data,
            text="".join(texts),
            usage=Usage(
                input_tokens=(usage.input_tokens or 0) + read + write,
                output_tokens=usage.output_tokens or 0,
                cache_read_tokens=read,
                cache_write_tokens=write,
            ),
        )

    async def close(self) -> None:
        """Closes the SDK's connection pool."""
        await self._sdk.close()


def _json_object(text: str) -> dict[str, Any] | None:
    """The structured output's JSON object, or None (the tolerant parser then reads the text)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class OpenAIClient:
    """GPT models (or an OpenAI-compatible server) through Chat Completions, scores as JSON.

    Args:
        model: e.g. ``gpt-5-mini``, or the local server's model name.
        api_key: handed to the SDK client; not in our attributes or repr.
        base_url: the server's ``/v1`` URL, or None for OpenAI.
        timeout_s: per-attempt timeout.
        max_retries: the SDK's retries of 408/409/429/5xx, timeouts and connection errors.
        temperature: sent unless the model is a reasoning model (gpt-5*, o1/o3/o4*), which rejects it.
        structured: ask for a strict JSON schema (``response_format``); else plain text
            that the rubric's tolerant parser reads.
        provider: "openai" or "openai_compatible"; the latter sends ``max_tokens``
            (what local servers know) and drops ``response_format`` for good when the
            server answers 400 about it.

    Attributes:
        supports_response_format: False once the server has refused ``response_format``.
    """

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        temperature: float = 0.0,
        structured: bool = True,
        provider: str = "openai",
    ) -> None:
        import openai

        self.provider = provider
        self.model = model
        self.base_url = base_url
        self.temperature = temperature
        self.structured = structured
        self.supports_response_format = True
        self._sdk = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries)
        # APIError covers the SDK's status, connection and timeout errors.
        self._call_errors = (openai.APIError, MalformedResponse, *_TIMEOUTS)
        self._refusals = (openai.BadRequestError, openai.UnprocessableEntityError)  # 400 / 422

    def __repr__(self) -> str:
        return (
            f"OpenAIClient(model={self.model!r}, provider={self.provider!r}, base_url={self.base_url!r}, "
            f"structured={self.structured})"
        )

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
        """One Chat Completions call asking for JSON that fills ``schema``.

        Args:
            system: the system prompt.
            user: the user message (after ``prefix``).
            schema: JSON schema of the answer.
            max_tokens: longest answer (reasoning tokens included, for reasoning models).
            prefix: the start of the user message that other calls share. OpenAI caches
                prefixes by itself; the layout (shared part first) is what lets it.
            cache: its ``key`` goes out as ``prompt_cache_key`` (OpenAI only, not local servers).

        Returns:
            The content parsed as a JSON object as ``data`` (None when it is not one),
            the content as ``text``, and the usage the API reported (0 where absent).

        Raises:
            CallFailed: the call failed after the SDK's retries (``openai.APIError``),
                or a 200 whose body is not a Chat Completions answer (``MalformedResponse``).
        """
        call = self._complete(system, prefix + user, schema, max_tokens, (cache or CacheMarks()).key)
        return await _failures_as_call_failed(call, self._call_errors)

    async def _complete(
        self, system: str, user: str, schema: dict[str, Any], max_tokens: int, cache_key: str | None
    ) -> RawAnswer:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
        if cache_key and self.provider == "openai":
            kwargs["prompt_cache_key"] = cache_key
        # OpenAI's reasoning models reject `max_tokens`; local servers may not know `max_completion_tokens`.
        kwargs["max_tokens" if self.provider == "openai_compatible" else "max_completion_tokens"] = max_tokens
        if self.provider == "openai_compatible" or not self.model.startswith(_NO_TEMPERATURE_PREFIXES):
            kwargs["temperature"] = self.temperature
        if self.structured and self.supports_response_format:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True},
            }
            try:
                completion = await self._create(response_format=response_format, **kwargs)
            except self._refusals as exc:
                if not (self.provider == "openai_compatible" and _refuses_response_format(exc)):
                    raise
                self.supports_response_format = False
                log.warning(
                    "teacher server %s does not support response_format json_schema; "
                    "asking for plain JSON text from now on",
                    self.base_url,
                )
                completion = await self._create(**kwargs)
        else:
            completion = await self._create(**kwargs)
        content = completion.choices[0].message.content if completion.choices else None
        text = content or ""
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return RawAnswer(data=parsed if isinstance(parsed, dict) else None, text=text, usage=_openai_usage(completion))

    async def _create(self, **kwargs: Any) -> Any:
        try:
            completion = await self._sdk.chat.completions.create(**kwargs)
        except json.JSONDecodeError as exc:
            raise MalformedResponse(f"response body is not JSON ({exc.msg})") from None
        if not hasattr(completion, "choices"):  # the SDK returns a non-JSON body as a str
            raise MalformedResponse("response body is not JSON")
        return completion

    async def close(self) -> None:
        """Closes the SDK's connection pool."""
        await self._sdk.close()


def _openai_usage(completion: Any) -> Usage:
    """The usage of a Chat Completions answer: prompt tokens (cached ones included), prompt-cache reads and
    writes (``prompt_tokens_details``), completion tokens; 0 where a server leaves them out."""
    usage = completion.usage
    if usage is None:
        return Usage()
    details = getattr(usage, "prompt_tokens_details", None)
    return Usage(
        input_tokens=usage.prompt_tokens or 0,
        output_tokens=usage.completion_tokens or 0,
        cache_read_tokens=(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0,
        cache_write_tokens=(getattr(details, "cache_write_tokens", 0) or 0) if details is not None else 0,
    )


def _refuses_response_format(exc: BaseException) -> bool:
    """A 400/422 whose message is about ``response_format`` / JSON schema."""
    if getattr(exc, "status_code", None) not in (400, 422):
        return False
    said = f"{getattr(exc, 'message', '')} {json.dumps(getattr(exc, 'body', None), default=str)}".lower()
    return any(word in said for word in ("response_format", "json_schema", "response format", "json schema"))


def create_client(config: TeacherConfig) -> TeacherClient:
    """Builds the client for ``config.provider``, with the key from the environment.

    Args:
        config: the ``teacher`` section.

    Returns:
        An ``AnthropicClient`` or ``OpenAIClient``.

    Raises:
        MissingApiKey: the key's environment variable is not set (not for openai_compatible).
        ValueError: ``provider`` is ``none``.
    """
    if config.provider not in DEFAULT_KEY_ENV:
        raise ValueError(f"teacher.provider is {config.provider!r}: there is no API teacher to build")
    env = config.api_key_env or DEFAULT_KEY_ENV[config.provider]
    api_key = os.environ.get(env) if env else None
    if not api_key:
        if config.provider != "openai_compatible":
            raise MissingApiKey(f"teacher.api_key_env: environment variable {env} is not set")
        api_key = LOCAL_PLACEHOLDER_KEY
    common = dict(
        api_key=api_key,
        base_url=config.base_url,
        timeout_s=config.timeout_s,
        max_retries=config.max_retries,
        temperature=config.temperature,
    )
    if config.provider == "anthropic":
        return AnthropicClient(config.model, **common)
    return OpenAIClient(config.model, provider=config.provider, **common)
