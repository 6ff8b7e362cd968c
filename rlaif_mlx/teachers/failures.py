"""What went wrong with a teacher call, in a line: the errors the clients raise and how they are described.

``describe_error`` turns what the SDK raised into a short line for logs and
metrics (never the key); ``is_fatal`` says whether retrying later could help.
Reads the SDKs' exceptions by class name, so importing it imports no SDK.
"""

from __future__ import annotations

import asyncio
import json

TIMEOUTS = (TimeoutError, asyncio.TimeoutError)  # one class from Python 3.11 on


class MissingApiKey(ValueError):
    """The environment variable that should hold the teacher's API key is not set."""


class MalformedResponse(RuntimeError):
    """The API answered 200 with a body that is not the JSON the SDK expects."""


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
    if "APITimeoutError" in names or isinstance(exc, TIMEOUTS):
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
