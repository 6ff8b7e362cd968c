"""A local HTTP server that speaks the Anthropic Messages and OpenAI Chat Completions wire formats.

The real ``anthropic`` and ``openai`` SDKs are pointed at it (no network, no
mocks). It answers with a settable function, can be told to fail
(429 with Retry-After, 5xx, a body that is not JSON, no answer at all, a dropped
connection), and records what arrived so tests can check retries, headers and
concurrency. Concurrency is checked by a rendezvous and counts, never by wall
time: ``hold_in_rounds(n)`` answers no request until n of its round are in
flight, and ``connections()`` counts the connections a client's pool opened.

Usage figures are fixed (``input_tokens``, ``output_tokens`` and, to test their
parsing, ``cache_read_tokens`` / ``cache_write_tokens``) unless ``usage_mode``
is "counted": then each request's tokens are counted and its prompt-cache reads
and writes follow ``prompt_cache`` (``llm_usage.py``), as the real APIs report them.

Usage::

    with LLMServer() as server:
        server.add_fault("429", retry_after=1)
        client = anthropic.AsyncAnthropic(api_key="k", base_url=server.url)
        ...
        assert server.count("anthropic") == 2

or take the ``llm_server`` fixture (``tests/conftest.py``).
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llm_usage import PromptCache, count

DEFAULT_SCORES = {"correctness": 8, "quality": 7, "efficiency": 6, "readability": 9, "rationale": "ok"}
FAULT_KINDS = ("400", "401", "404", "429", "500", "503", "529", "malformed", "hang", "drop")
ENDPOINTS = {"/v1/messages": "anthropic", "/v1/chat/completions": "openai"}


def default_answer(request: dict[str, Any]) -> dict[str, Any]:
    """The answer every request gets unless a test sets ``server.answer``: a valid score dict."""
    return dict(DEFAULT_SCORES)


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of answering it.

    Attributes:
        kind: one of ``FAULT_KINDS``: an HTTP status ("400", "401", "404", "429",
            "500", "503", "529"), "malformed" (200 with a body that is not JSON), "hang" (no
            answer until the client gives up or the server stops) or "drop"
            (close the connection without a response).
        retry_after: seconds for a ``Retry-After`` header, or None.
        retry_after_ms: milliseconds for a ``retry-after-ms`` header (both SDKs
            prefer it; keeps 5xx retries fast), or None.
        content_type: the Content-Type of a "malformed" body.
    """

    kind: str
    retry_after: float | None = None
    retry_after_ms: int | None = None
    content_type: str = "application/json"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived.

    Attributes:
        endpoint: "anthropic", "openai" or "unknown".
        path: the URL path.
        headers: the headers, names lower-cased.
        body: the JSON body (None when it was not JSON).
        arrived: ``time.monotonic()`` at arrival.
        fault: the fault applied to it, or None.
        connection: the client's (host, port): one per TCP connection it opened.
        prompt_usage: counted mode: the prompt side of its usage, from the cache as it stood on arrival.
        prefixes: counted mode: the prompt-cache prefixes to store once it is answered.
    """

    endpoint: str
    path: str
    headers: dict[str, str]
    body: Any
    arrived: float
    fault: Fault | None
    connection: tuple[str, int] = ("", 0)
    prompt_usage: dict[str, int] | None = None
    prefixes: tuple[str, ...] = ()


class LLMServer:
    """The server, its settings and its counters; everything is safe to change while it runs.

    Attributes:
        answer: ``callable(request_json) -> dict | str``; a dict becomes the tool
            input (Anthropic, when the request has tools) or the JSON content
            (OpenAI); a str is sent as plain text.
        reject_response_format: answer 400 to OpenAI requests carrying
            ``response_format`` (a local server without JSON-schema support).
        input_tokens, output_tokens: the usage figures each answer reports (fixed mode).
        cache_read_tokens, cache_write_tokens: the prompt-cache figures each answer reports (fixed mode).
        usage_mode: "fixed" (the figures above) or "counted" (tokens counted, the prompt cache simulated).
        prompt_cache: counted mode: the prefixes the provider holds (``llm_usage.PromptCache``).
        include_usage: leave ``usage`` out of OpenAI answers when False.
        requests: every request so far, in arrival order.
        max_in_flight: the most requests being handled at once.
        rounds_timed_out: rounds of ``hold_in_rounds`` that never filled (a test asserts 0).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.answer: Callable[[dict[str, Any]], dict[str, Any] | str] = default_answer
        self.reject_response_format = False
        self.input_tokens = 120
        self.output_tokens = 30
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.usage_mode = "fixed"
        self.prompt_cache = PromptCache()
        self.include_usage = True
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self.rounds_timed_out = 0
        self._in_flight = 0
        self._round_size: int | None = None
        self._round_timeout_s = 0.0
        self._held = 0  # requests that have joined a round since ``hold_in_rounds``
        self._rounds: dict[int, threading.Event] = {}
        self._faults: deque[Fault] = deque()
        self._sticky: Fault | None = None
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)  # notified as each request arrives
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._ids = itertools.count(1)
        self._httpd = _Server((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # ----- lifecycle
    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the Anthropic SDK's base_url."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: the OpenAI SDK's base_url."""
        return self.url + "/v1"

    def start(self) -> LLMServer:
        """Serves in a background thread."""
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="llm-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving; wakes hung and held handlers and waits for every handler thread to end."""
        self._stopping.set()
        with self._lock:
            for released in self._rounds.values():
                released.set()
            self._arrival.notify_all()
        self._httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        # Idle keep-alive handlers block reading the next request: unblock them.
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        with self._lock:
            handlers = list(self._handler_threads)
        for thread in handlers:  # daemon threads: server_close does not join them, so a woken one may still run
            thread.join(timeout=600)  # a hang guard, not a speed bound
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- faults
    def add_fault(
        self,
        kind: str,
        *,
        times: int | None = 1,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Applies a fault to the next ``times`` requests (after those already queued).

        Args:
            kind: one of ``FAULT_KINDS``.
            times: how many requests; None: every request from now until ``clear_faults``.
            retry_after: seconds for a ``Retry-After`` header.
            retry_after_ms: milliseconds for a ``retry-after-ms`` header.
            content_type: the Content-Type of a "malformed" body.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        fault = Fault(kind, retry_after, retry_after_ms, content_type)
        with self._lock:
            if times is None:
                self._sticky = fault
            else:
                self._faults.extend([fault] * times)

    def clear_faults(self) -> None:
        """Forgets queued and persistent faults."""
        with self._lock:
            self._faults.clear()
            self._sticky = None

    # ----- rendezvous
    def hold_in_rounds(self, size: int, *, timeout_s: float = 30.0) -> None:
        """From now on, requests are answered in rounds of ``size``: each waits until ``size`` have arrived.

        The k-th request from now on belongs to round ``k // size``. A client that
        keeps at most ``size`` calls in flight fills each round exactly; one that
        keeps fewer never fills one, and the round gives up after ``timeout_s``
        (counted in ``rounds_timed_out``, then answered) so the test fails
        instead of hanging.

        Args:
            size: requests per round.
            timeout_s: how long a round waits to fill.
        """
        with self._lock:
            self._round_size, self._round_timeout_s = size, timeout_s
            self._held, self._rounds = 0, {}

    def wait_for_requests(self, count: int, *, timeout_s: float = 30.0) -> bool:
        """Blocks until ``count`` requests have arrived (True), or ``timeout_s`` passed (False)."""
        with self._arrival:
            return self._arrival.wait_for(lambda: len(self.requests) >= count, timeout=timeout_s)

    # ----- counters
    def count(self, endpoint: str | None = None) -> int:
        """Requests so far: all, or those to one endpoint ("anthropic", "openai" or a path)."""
        with self._lock:
            return sum(1 for r in self.requests if endpoint in (None, r.endpoint, r.path))

    def arrivals(self, endpoint: str | None = None) -> list[float]:
        """Arrival times (``time.monotonic()``) of the requests, in order."""
        with self._lock:
            return [r.arrived for r in self.requests if endpoint in (None, r.endpoint, r.path)]

    def connections(self) -> int:
        """How many TCP connections the requests so far came on.

        A client's connection pool opens a new connection only when none is idle, so
        this is the most calls it ever had in flight at once (keep-alive reuses the rest).
        """
        with self._lock:
            return len({r.connection for r in self.requests})

    def live_handler_threads(self) -> int:
        """Handler threads still running (0 after ``stop``)."""
        with self._lock:
            return sum(1 for t in self._handler_threads if t.is_alive())

    # ----- used by the handler
    def _arrive(self, path: str, headers: dict[str, str], body: Any, connection: tuple[str, int]) -> RecordedRequest:
        with self._lock:
            fault = self._faults.popleft() if self._faults else self._sticky
            endpoint = ENDPOINTS.get(path, "unknown")
            prompt_usage, prefixes = None, []
            if self.usage_mode == "counted" and endpoint != "unknown" and isinstance(body, dict):
                # looked up on arrival: requests sent together all miss, as on the real APIs
                prompt_usage, prefixes = getattr(self.prompt_cache, endpoint)(body)
            record = RecordedRequest(
                endpoint, path, headers, body, time.monotonic(), fault, connection, prompt_usage, tuple(prefixes)
            )
            self.requests.append(record)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self._arrival.notify_all()
        return record

    def _hold(self) -> None:
        """Waits for this request's round to fill (``hold_in_rounds``); returns at once when not holding."""
        with self._lock:
            if self._round_size is None:
                return
            number, self._held = self._held, self._held + 1
            released = self._rounds.setdefault(number // self._round_size, threading.Event())
            if number % self._round_size == self._round_size - 1 or self._stopping.is_set():
                released.set()  # the round is full: every request in it goes on
            timeout_s = self._round_timeout_s
        if not released.wait(timeout_s):
            with self._lock:
                if not released.is_set():
                    self.rounds_timed_out += 1
                    released.set()  # answer the rest of this round too: one failure is enough

    def _usage(self, record: RecordedRequest, content: dict[str, Any] | str) -> dict[str, Any]:
        """The ``usage`` object of an answer in the endpoint's format; stores the request's prefixes."""
        text = content if isinstance(content, str) else json.dumps(content)
        if record.prompt_usage is None:
            read, write, output = self.cache_read_tokens, self.cache_write_tokens, self.output_tokens
            prompt = {"input_tokens": self.input_tokens, "prompt_tokens": self.input_tokens + read + write}
        else:
            with self._lock:
                self.prompt_cache.store(list(record.prefixes))
            prompt, output = record.prompt_usage, count(text)
            read = prompt.get("cache_read_input_tokens", prompt.get("cached_tokens", 0))
            write = prompt.get("cache_creation_input_tokens", 0)
        if record.endpoint == "anthropic":
            return {
                "input_tokens": prompt["input_tokens"],
                "output_tokens": output,
                "cache_creation_input_tokens": write,
                "cache_read_input_tokens": read,
            }
        return {
            "prompt_tokens": prompt["prompt_tokens"],
            "completion_tokens": output,
            "total_tokens": prompt["prompt_tokens"] + output,
            "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
        }

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _next_id(self) -> int:
        return next(self._ids)


class _Server(ThreadingHTTPServer):
    # The listen backlog: the default 5 refuses connections when a client opens a dozen at once.
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect

    def setup(self) -> None:
        super().setup()
        owner = self._owner
        with owner._lock:
            owner._connections.add(self.connection)
            owner._handler_threads.add(threading.current_thread())

    def finish(self) -> None:
        with self._owner._lock:
            self._owner._connections.discard(self.connection)
        super().finish()

    @property
    def _owner(self) -> LLMServer:
        return self.server.owner  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # keep pytest output clean

    def do_POST(self) -> None:
        owner = self._owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = owner._arrive(self.path, headers, body, tuple(self.client_address[:2]))
        try:
            owner._hold()
            self._respond(owner, record)
        finally:
            owner._leave()

    def _respond(self, owner: LLMServer, record: RecordedRequest) -> None:
        fault, endpoint = record.fault, record.endpoint
        if endpoint == "unknown":
            return self._send_json(404, _error(endpoint, 404, f"no route {record.path}"))
        if fault is not None and fault.kind == "hang":
            owner._stopping.wait()  # until the server stops; the client has long given up
            self.close_connection = True
            return None
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if fault is not None and fault.kind == "malformed":
            return self._send(200, b"<html>this is not JSON {", fault.content_type)
        if fault is not None:
            status = int(fault.kind)
            extra = {}
            if fault.retry_after is not None:
                extra["Retry-After"] = f"{fault.retry_after:g}"
            if fault.retry_after_ms is not None:
                extra["retry-after-ms"] = str(fault.retry_after_ms)
            return self._send_json(status, _error(endpoint, status, f"injected {status}"), extra)
        request = record.body if isinstance(record.body, dict) else {}
        refused = _refused_by_the_model(endpoint, request)
        if refused:
            return self._send_json(400, _error(endpoint, 400, refused))
        if endpoint == "openai" and owner.reject_response_format and "response_format" in request:
            message = "response_format json_schema is not supported by this server"
            return self._send_json(400, _error(endpoint, 400, message, param="response_format"))
        try:
            content = owner.answer(request)
        except Exception as exc:  # a broken test answer shows as a 500, not a hung client
            return self._send_json(500, _error(endpoint, 500, f"answer raised {exc!r}"))
        usage = owner._usage(record, content)
        if endpoint == "anthropic":
            return self._send_json(200, _anthropic_message(owner, request, content, usage))
        return self._send_json(200, _openai_completion(owner, request, content, usage))

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


# Claude Sonnet 5.5 and Opus 5.5 answer 400 to a forced tool choice and to sampling parameters
# (Anthropic's Sonnet 5.5 migration guide); the server refuses them as those models do.
NO_FORCED_TOOL_MODELS = ("claude-sonnet-5-5", "claude-opus-5-5")


def _refused_by_the_model(endpoint: str, request: dict[str, Any]) -> str | None:
    if endpoint != "anthropic" or not str(request.get("model", "")).startswith(NO_FORCED_TOOL_MODELS):
        return None
    if (request.get("tool_choice") or {}).get("type") in ("tool", "any"):
        return "tool_choice forcing a tool is not supported with this model"
    sampling = sorted(k for k in ("temperature", "top_p", "top_k") if k in request)
    return f"{', '.join(sampling)}: sampling parameters are not supported with this model" if sampling else None


def _error(endpoint: str, status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    if endpoint == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _anthropic_message(
    owner: LLMServer, request: dict[str, Any], content: dict[str, Any] | str, usage: dict[str, Any]
) -> dict[str, Any]:
    tools = request.get("tools") or []
    choice = request.get("tool_choice") or {}
    tool_name = choice.get("name") if choice.get("type") == "tool" else (tools[0].get("name") if tools else None)
    if isinstance(content, dict) and tool_name:
        block: dict[str, Any] = {
            "type": "tool_use",
            "id": f"toolu_{owner._next_id()}",
            "name": tool_name,
            "input": content,
        }
        stop_reason = "tool_use"
    else:
        text = content if isinstance(content, str) else json.dumps(content)
        block, stop_reason = {"type": "text", "text": text}, "end_turn"
    return {
        "id": f"msg_{owner._next_id()}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "unknown"),
        "content": [block],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _openai_completion(
    owner: LLMServer, request: dict[str, Any], content: dict[str, Any] | str, usage: dict[str, Any]
) -> dict[str, Any]:
    text = content if isinstance(content, str) else json.dumps(content)
    answer: dict[str, Any] = {
        "id": f"chatcmpl-{owner._next_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "unknown"),
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": text, "refusal": None},
            }
        ],
    }
    if owner.include_usage:
        answer["usage"] = usage
    return answer
