"""Provider clients: one API call through the official async SDKs, and what went wrong in a line.

``AnthropicClient`` asks for the scores through one forced tool (Messages API);
``OpenAIClient`` through a strict JSON schema (Chat Completions), also for
OpenAI-compatible local servers (``base_url``), which may not support the
schema: then it falls back to plain JSON text once and remembers. Retries,
backoff (``Retry-After`` honoured) and timeouts are the SDKs' own.

A call that fails for good raises ``base.CallFailed`` (its cause: the SDK's
``APIError``, a ``MalformedResponse`` or a timeout), which the judge counts;
any other exception is a bug in our code or the SDK's and propagates.

API keys are read from the environment by ``create_client`` and handed straight
to the SDK: they are never kept on our objects, logged, or put in our errors.
The SDKs are imported when a client is built, not when this module is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable
from typing import Any, TypeVar

from rlaif_mlx.config import TeacherConfig
from rlaif_mlx.teachers.base import CallFailed, RawAnswer, TeacherClient, Usage

log = logging.getLogger(__name__)

TOOL_NAME = "submit_scores"
SCHEMA_NAME = "scores"
DEFAULT_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "openai_compatible": None}
LOCAL_PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, but the OpenAI SDK requires one
# OpenAI reasoning models reject `temperature` (only the default is allowed).
_NO_TEMPERATURE_PREFIXES = ("gpt-5", "o1", "o3", "o4")


class MissingApiKey(ValueError):
    """The environment variable that should hold the teacher's API key is not set."""


class MalformedResponse(RuntimeError):
    """The API answered 200 with a body that is not the JSON the SDK expects."""


_T = TypeVar("_T")
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)  # one class from Python 3.11 on


async def _failures_as_call_failed(call: Awaitable[_T], expected: tuple[type[BaseException], ...]) -> _T:
    """Awaits ``call``; what a failed call raises (``expected``) becomes ``CallFailed``, the rest propagates."""
    try:
        return await call
    except expected as exc:
        raise CallFailed(describe_error(exc), fatal=is_fatal(exc)) from exc


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

    async def complete(self, *, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> RawAnswer:
        """One Messages call that must answer through the ``submit_scores`` tool.

        Args:
            system: the system prompt.
            user: the user message.
            schema: JSON schema of the tool's input.
            max_tokens: longest answer.

        Returns:
            The tool input as ``data`` (None when the model wrote only text), the
            text blocks joined, and the usage the API reported.

        Raises:
            CallFailed: the call failed after the SDK's retries (``anthropic.APIError``),
                or a 200 whose body is not a Messages answer (``MalformedResponse``).
        """
        return await _failures_as_call_failed(self._complete(system, user, schema, max_tokens), self._call_errors)

    async def _complete(self, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> RawAnswer:
        tool = {
            "name": TOOL_NAME,
            "description": "Submit the rubric scores for the completion.",
            "input_schema": schema,
        }
        try:
            message = await self._sdk.messages.create(
                model=self.model,
                max_tokens=max_tokens,
                system=system,
                messages=[{"role": "user", "content": user}],
                tools=[tool],
                tool_choice={"type": "tool", "name": TOOL_NAME},
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
        usage = message.usage
        # Prompt-cache reads and writes are input tokens too; count them all so cost is never underestimated.
        input_tokens = sum(
            getattr(usage, name, 0) or 0
            for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        return RawAnswer(
            data=data,
            text="".join(texts),
            usage=Usage(input_tokens=input_tokens, output_tokens=usage.output_tokens or 0),
        )

    async def close(self) -> None:
        """Closes the SDK's connection pool."""
        await self._sdk.close()


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

    async def complete(self, *, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> RawAnswer:
        """One Chat Completions call asking for JSON that fills ``schema``.

        Args:
            system: the system prompt.
            user: the user message.
            schema: JSON schema of the answer.
            max_tokens: longest answer (reasoning tokens included, for reasoning models).

        Returns:
            The content parsed as a JSON object as ``data`` (None when it is not one),
            the content as ``text``, and the usage the API reported (0 where absent).

        Raises:
            CallFailed: the call failed after the SDK's retries (``openai.APIError``),
                or a 200 whose body is not a Chat Completions answer (``MalformedResponse``).
        """
        return await _failures_as_call_failed(self._complete(system, user, schema, max_tokens), self._call_errors)

    async def _complete(self, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> RawAnswer:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
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
        usage = completion.usage
        return RawAnswer(
            data=parsed if isinstance(parsed, dict) else None,
            text=text,
            usage=Usage(
                input_tokens=(usage.prompt_tokens or 0) if usage else 0,
                output_tokens=(usage.completion_tokens or 0) if usage else 0,
            ),
        )

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


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _retries_taken(exc: BaseException) -> int:
    """Retries the SDK made before giving up, from the header it puts on each attempt."""
    request = getattr(exc, "request", None)  # the SDKs keep the last attempt's request
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) if request is not None else 0
    except (TypeError, ValueError):
        return 0


def _after(retries: int) -> str:
    return f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""


def describe_error(exc: BaseException) -> str:
    """A short line saying what went wrong with a call, for logs and metrics (never the key).

    Args:
        exc: what the SDK or the client raised for a failed call (``CallFailed``'s cause).

    Returns:
        e.g. ``rate limited (429) after 3 retries``, ``server error 500 after 1 retry``,
        ``timeout after 5s``, ``timeout (5s) after 2 retries``, ``connection error``, ``malformed response (not JSON)``.
    """
    names = _class_names(exc)
    retries = _retries_taken(exc)
    if isinstance(exc, (MalformedResponse, json.JSONDecodeError)) or "APIResponseValidationError" in names:
        return "malformed response (not JSON)"
    if "APITimeoutError" in names or isinstance(exc, _TIMEOUTS):
        timeout = None
        request = getattr(exc, "request", None)
        if request is not None:
            timeout = (request.extensions.get("timeout") or {}).get("read")
        if not isinstance(timeout, (int, float)):
            return "timeout" + _after(retries)
        return f"timeout ({timeout:g}s)" + _after(retries) if retries else f"timeout after {timeout:g}s"
    if "APIConnectionError" in names:
        return "connection error" + _after(retries)
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status == 429:
            return "rate limited (429)" + _after(retries)
        if status >= 500:
            return f"server error {status}" + _after(retries)
        what = {400: "bad request", 401: "authentication failed", 403: "permission denied", 404: "not found"}.get(
            status, "HTTP error"
        )
        line = f"{what} ({status})"
        api_message = _api_message(exc)
        if api_message:
            line += f": {api_message}"
        if status == 404:
            line += " (check teacher.model and teacher.base_url)"
        return line
    first_line = str(exc).strip().split("\n")[0][:160]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _api_message(exc: BaseException) -> str:
    """The API's own explanation from the error body, on one line and shortened."""
    body = getattr(exc, "body", None)
    if not isinstance(body, dict):
        return ""
    # Anthropic keeps the whole body ({"error": {...}}); OpenAI keeps only the error object.
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    message = error.get("message")
    return " ".join(str(message).split())[:160] if message else ""


def is_fatal(exc: BaseException) -> bool:
    """Whether retrying later cannot help: the key was refused or the model / endpoint does not exist."""
    return isinstance(exc, MissingApiKey) or getattr(exc, "status_code", None) in (401, 403, 404)
