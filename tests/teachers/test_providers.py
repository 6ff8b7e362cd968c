"""The provider clients with the real anthropic / openai SDKs against the local server (no mocks).

Retry delays are kept short with small ``Retry-After`` / ``retry-after-ms``
values, which both SDKs honour before their own exponential backoff.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from llm_server import DEFAULT_SCORES, LLMServer

from rlaif_mlx.config import TeacherConfig
from rlaif_mlx.teachers.base import CallFailed, RawAnswer, Usage
from rlaif_mlx.teachers.providers import (
    TOOL_NAME,
    AnthropicClient,
    MalformedResponse,
    MissingApiKey,
    OpenAIClient,
    create_client,
    describe_error,
    is_fatal,
)

KEY = "sk-test-0123456789-secret"
SCHEMA = {
    "type": "object",
    "properties": {name: {"type": "integer"} for name in ("correctness", "quality", "efficiency", "readability")}
    | {"rationale": {"type": "string"}},
    "required": ["correctness", "quality", "efficiency", "readability", "rationale"],
    "additionalProperties": False,
}
PROVIDERS = ["anthropic", "openai"]


def make_client(
    provider: str, server: LLMServer, *, timeout_s: float = 5.0, max_retries: int = 0, **kwargs: Any
) -> AnthropicClient | OpenAIClient:
    if provider == "anthropic":
        return AnthropicClient(
            kwargs.pop("model", "claude-test"),
            api_key=KEY,
            base_url=server.url,
            timeout_s=timeout_s,
            max_retries=max_retries,
            **kwargs,
        )
    return OpenAIClient(
        kwargs.pop("model", "gpt-4.1-mini"),
        api_key=KEY,
        base_url=server.openai_url,
        timeout_s=timeout_s,
        max_retries=max_retries,
        **kwargs,
    )


def complete(client: AnthropicClient | OpenAIClient, calls: int = 1) -> RawAnswer:
    """Runs ``calls`` completions one after the other and closes the client; returns the last answer."""

    async def go() -> RawAnswer:
        try:
            for _ in range(calls):
                answer = await client.complete(
                    system="You grade code.", user="def f(): pass", schema=SCHEMA, max_tokens=256
                )
            return answer
        finally:
            await client.close()

    return asyncio.run(go())


def fail(client: AnthropicClient | OpenAIClient) -> BaseException:
    """Runs one completion that must fail; returns what the SDK (or the client) raised: ``CallFailed``'s cause."""
    with pytest.raises(CallFailed) as info:
        complete(client)
    failed, cause = info.value, info.value.__cause__
    assert failed.description == describe_error(cause) and failed.fatal == is_fatal(cause)
    assert KEY not in str(failed)
    return cause


# ----------------------------------------------------------------------------- answers


def test_anthropic_scores_come_back_through_the_forced_tool(llm_server: LLMServer) -> None:
    answer = complete(make_client("anthropic", llm_server))

    assert answer == RawAnswer(data=DEFAULT_SCORES, text="", usage=Usage(input_tokens=120, output_tokens=30))
    (request,) = llm_server.requests
    assert request.path == "/v1/messages"
    assert request.headers["authorization"] == f"Bearer {KEY}"  # SDK 2.x sends the key as a bearer token
    body = request.body
    assert body["tools"] == [
        {"name": TOOL_NAME, "description": body["tools"][0]["description"], "input_schema": SCHEMA}
    ]
    assert body["tool_choice"] == {"type": "tool", "name": TOOL_NAME}
    assert body["system"] == "You grade code."
    assert body["messages"] == [{"role": "user", "content": "def f(): pass"}]
    assert body["max_tokens"] == 256 and body["model"] == "claude-test"
    assert "temperature" not in body  # API version 2026-10-21 rejects sampling parameters


def test_openai_scores_come_back_as_strict_json_schema(llm_server: LLMServer) -> None:
    answer = complete(make_client("openai", llm_server, temperature=0.3))

    assert answer.data == DEFAULT_SCORES
    assert answer.usage == Usage(input_tokens=120, output_tokens=30)
    (request,) = llm_server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "scores", "schema": SCHEMA, "strict": True},
    }
    assert body["messages"] == [
        {"role": "system", "content": "You grade code."},
        {"role": "user", "content": "def f(): pass"},
    ]
    assert body["max_completion_tokens"] == 256 and "max_tokens" not in body
    assert body["temperature"] == 0.3


def test_openai_reasoning_model_gets_no_temperature(llm_server: LLMServer) -> None:
    complete(make_client("openai", llm_server, model="gpt-5-mini", temperature=0.3))

    body = llm_server.requests[0].body
    assert "temperature" not in body
    assert body["max_completion_tokens"] == 256 and "max_tokens" not in body


def test_openai_unstructured_and_usage_absent(llm_server: LLMServer) -> None:
    llm_server.include_usage = False

    answer = complete(make_client("openai", llm_server, structured=False))

    assert answer.data == DEFAULT_SCORES  # plain JSON text still parses
    assert answer.usage == Usage(0, 0)
    assert "response_format" not in llm_server.requests[0].body


@pytest.mark.parametrize("provider", PROVIDERS)
def test_plain_text_answer_has_no_data(llm_server: LLMServer, provider: str) -> None:
    llm_server.answer = lambda request: "Looks fine. correctness: 8/10"

    answer = complete(make_client(provider, llm_server))

    assert answer.data is None
    assert answer.text == "Looks fine. correctness: 8/10"


def test_requests_run_concurrently(llm_server: LLMServer) -> None:
    llm_server.hold_in_rounds(4)  # no answer until all 4 are in flight: one at a time would never get one
    client = make_client("openai", llm_server, timeout_s=60)

    async def go() -> list[RawAnswer]:
        try:
            return await asyncio.gather(
                *[client.complete(system="s", user=str(i), schema=SCHEMA, max_tokens=64) for i in range(4)]
            )
        finally:
            await client.close()

    assert all(a.data == DEFAULT_SCORES for a in asyncio.run(go()))
    assert llm_server.rounds_timed_out == 0 and llm_server.max_in_flight == llm_server.connections() == 4


# ----------------------------------------------------------------------------- retries and failures


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_retry_after_is_honoured(llm_server: LLMServer, provider: str) -> None:
    llm_server.add_fault("429", retry_after=1)

    answer = complete(make_client(provider, llm_server, max_retries=2))

    assert answer.data == DEFAULT_SCORES
    first, second = llm_server.arrivals()
    assert second - first >= 0.95


@pytest.mark.parametrize("provider", PROVIDERS)
def test_500_twice_then_success(llm_server: LLMServer, provider: str) -> None:
    llm_server.add_fault("500", times=2, retry_after_ms=20)

    answer = complete(make_client(provider, llm_server, max_retries=2))

    assert answer.data == DEFAULT_SCORES
    assert llm_server.count() == 3


@pytest.mark.parametrize("provider", PROVIDERS)
def test_500_forever_gives_up_after_the_retries(llm_server: LLMServer, provider: str) -> None:
    llm_server.add_fault("500", times=None, retry_after_ms=20)

    exc = fail(make_client(provider, llm_server, max_retries=1))

    assert getattr(exc, "status_code", None) == 500
    assert llm_server.count() == 2
    assert describe_error(exc) == "server error 500 after 1 retry"
    assert not is_fatal(exc)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_malformed_body_raises(llm_server: LLMServer, provider: str, content_type: str) -> None:
    llm_server.add_fault("malformed", times=None, content_type=content_type)

    exc = fail(make_client(provider, llm_server, max_retries=2))

    assert isinstance(exc, MalformedResponse)
    assert llm_server.count() == 1  # a 200 is not retried by the SDKs
    assert describe_error(exc) == "malformed response (not JSON)"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hang_times_out_after_the_timeout_without_retrying(llm_server: LLMServer, provider: str) -> None:
    llm_server.add_fault("hang", times=None)

    exc = fail(make_client(provider, llm_server, timeout_s=1, max_retries=0))

    assert type(exc).__name__ == "APITimeoutError"
    assert describe_error(exc) == "timeout after 1s"
    # The client gave up on its own clock: the server may still be reading the request, so wait for it.
    assert llm_server.wait_for_requests(1) and llm_server.count() == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hang_is_retried(llm_server: LLMServer, provider: str) -> None:
    llm_server.add_fault("hang", times=None)

    exc = fail(make_client(provider, llm_server, timeout_s=1, max_retries=1))

    assert llm_server.wait_for_requests(2) and llm_server.count() == 2
    assert describe_error(exc) == "timeout (1s) after 1 retry"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dropped_connection_is_a_connection_error(llm_server: LLMServer, provider: str) -> None:
    llm_server.add_fault("drop", times=None)

    exc = fail(make_client(provider, llm_server, max_retries=1))

    assert type(exc).__name__ == "APIConnectionError"
    assert llm_server.count() == 2
    assert describe_error(exc) == "connection error after 1 retry"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_refused_key_is_fatal_and_not_retried(llm_server: LLMServer, provider: str) -> None:
    llm_server.add_fault("401", times=None)

    exc = fail(make_client(provider, llm_server, max_retries=2))

    assert llm_server.count() == 1
    assert is_fatal(exc)
    assert describe_error(exc).startswith("authentication failed (401)")
    assert KEY not in describe_error(exc) and KEY not in str(exc)


def test_server_stop_ends_hung_handlers() -> None:
    server = LLMServer().start()
    server.add_fault("hang", times=None)
    client = make_client("openai", server, timeout_s=60)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            complete(client)
        except CallFailed as exc:
            raised.append(exc.__cause__)

    caller = threading.Thread(target=call)
    caller.start()
    assert server.wait_for_requests(1), "the request never arrived"
    assert server.live_handler_threads() >= 1  # hung, waiting for the server to stop

    server.stop()

    assert server.live_handler_threads() == 0
    caller.join(timeout=600)
    assert not caller.is_alive() and type(raised[0]).__name__ == "APIConnectionError"


# ----------------------------------------------------------------------------- openai_compatible fallback


def test_compatible_server_without_json_schema_falls_back_once(
    llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm_server.reject_response_format = True
    client = create_client(
        TeacherConfig(
            provider="openai_compatible", model="local", base_url=llm_server.openai_url, max_retries=0, cache_path=None
        )
    )
    assert isinstance(client, OpenAIClient)

    answer = complete(client, calls=2)

    assert answer.data == DEFAULT_SCORES
    first, retry, second = llm_server.requests
    assert "response_format" in first.body
    assert "response_format" not in retry.body and "response_format" not in second.body
    assert client.supports_response_format is False
    assert first.headers["authorization"] == "Bearer not-needed"
    assert first.body["max_tokens"] == 256 and "max_completion_tokens" not in first.body


def test_openai_proper_does_not_fall_back(llm_server: LLMServer) -> None:
    llm_server.reject_response_format = True

    exc = fail(make_client("openai", llm_server, max_retries=2))

    assert getattr(exc, "status_code", None) == 400
    assert llm_server.count() == 1
    assert describe_error(exc).startswith("bad request (400): response_format")


# ----------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("provider", "env", "variable"),
    [
        ("anthropic", None, "ANTHROPIC_API_KEY"),
        ("openai", None, "OPENAI_API_KEY"),
        ("anthropic", "MY_JUDGE_KEY", "MY_JUDGE_KEY"),
    ],
)
def test_missing_key_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, provider: str, env: str | None, variable: str
) -> None:
    monkeypatch.delenv(variable, raising=False)

    with pytest.raises(MissingApiKey) as info:
        create_client(TeacherConfig(provider=provider, model="m", api_key_env=env, cache_path=None))

    assert str(info.value) == f"teacher.api_key_env: environment variable {variable} is not set"
    assert is_fatal(info.value)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_key_from_the_environment_is_sent_and_never_shown(
    llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    variable = "ANTHROPIC_API_KEY" if provider == "anthropic" else "OPENAI_API_KEY"
    monkeypatch.setenv(variable, KEY)
    base_url = llm_server.url if provider == "anthropic" else llm_server.openai_url
    client = create_client(
        TeacherConfig(provider=provider, model="m", base_url=base_url, max_retries=0, cache_path=None)
    )

    ours = {name: value for name, value in vars(client).items() if name != "_sdk"}  # the SDK client must hold it
    assert KEY not in repr(client) and KEY not in repr(ours)
    assert complete(client).data == DEFAULT_SCORES
    assert llm_server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    llm_server.add_fault("500")
    exc = fail(
        create_client(TeacherConfig(provider=provider, model="m", base_url=base_url, max_retries=0, cache_path=None))
    )
    assert KEY not in describe_error(exc) and KEY not in str(exc)


@pytest.mark.parametrize("model", ["claude-sonnet-5-5", "claude-opus-5-5-20261201"])
def test_models_that_refuse_a_forced_tool_answer_through_structured_output(llm_server, model):
    # The server answers 400 to a forced tool or a sampling parameter for these models, as the API does.
    answer = complete(make_client("anthropic", llm_server, model=model))
    (request,) = llm_server.requests
    body = request.body
    assert "tool_choice" not in body and "tools" not in body and "temperature" not in body
    assert body["output_config"]["format"] == {"type": "json_schema", "schema": SCHEMA}
    assert answer.data == DEFAULT_SCORES  # the JSON text, read as the structured answer


def test_older_claude_models_still_answer_through_the_forced_tool(llm_server):
    complete(make_client("anthropic", llm_server, model="claude-sonnet-4-5"))
    body = llm_server.requests[0].body
    assert body["tool_choice"] == {"type": "tool", "name": "submit_scores"} and "output_config" not in body
