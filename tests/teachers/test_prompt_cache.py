"""The providers' prompt caches, through the real SDKs against the loopback server in counted mode.

The server counts tokens and keeps prefixes as the APIs do (``tests/llm_usage.py``):
Anthropic at marked blocks past the model's minimum, OpenAI by itself in
128-token steps; a prefix is stored when its answer is sent, so calls sent
together all miss. The checks are on the usage each request got and on the
ledger's dollars, never on time.
"""

from __future__ import annotations

import pytest

from rlaif_mlx.config import TeacherConfig
from rlaif_mlx.teachers.base import JudgeRequest, Usage
from rlaif_mlx.teachers.judge import Teacher
from rlaif_mlx.teachers.providers import AnthropicClient, OpenAIClient

RULES = "\n".join(f"- Rule {i}: the result for input {i} must equal {i * i} plus the offset." for i in range(40))
LONG_TASK = f"Write shift(x, offset) that obeys every rule below.\n{RULES}"  # ~600 tokens: the prefix qualifies


def requests(task: str, n: int, *, tag: str = "") -> list[JudgeRequest]:
    return [
        JudgeRequest(uid=f"{tag}{task[6:11]}-{i}", prompt=task, completion=f"def f(x):\n    return x + {i}  # {tag}")
        for i in range(n)
    ]


def make(server, *, provider: str, model: str, **overrides) -> Teacher:
    settings = {
        "provider": provider,
        "model": model,
        "max_retries": 0,
        "timeout_s": 10,
        "cache_path": None,
        "base_url": server.url if provider == "anthropic" else server.openai_url,
    } | overrides
    return Teacher(TeacherConfig(**settings))


@pytest.fixture
def counted(llm_server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    llm_server.usage_mode = "counted"
    return llm_server


def user_blocks(record) -> list:
    content = record.body["messages"][-1]["content"]
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def dollars(records, *, price: tuple[float, float], cache: tuple[float, float], anthropic: bool) -> float:
    """What the requests cost by the provider's own usage figures, priced by hand."""
    total = 0.0
    for record in records:
        u = record.prompt_usage
        if anthropic:
            plain, read, write = u["input_tokens"], u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
        else:
            plain, read, write = u["prompt_tokens"] - u["cached_tokens"], u["cached_tokens"], 0
        total += plain * price[0] + read * cache[0] + write * cache[1]
    return total / 1e6  # output tokens are priced alike with and without the cache: left out


def test_anthropic_marks_the_shared_prefix_and_the_other_calls_read_it(counted):
    # claude-sonnet-4-5: $3 input, $0.30 cache read, $3.75 cache write per Mtok; caches prefixes of 1,024 tokens
    tasks = [LONG_TASK, LONG_TASK.replace("shift", "slide")]
    teacher = make(counted, provider="anthropic", model="claude-sonnet-4-5", max_concurrency=8)
    got = teacher.judge([r for task in tasks for r in requests(task, 4)])
    assert all(j.score is not None for j in got.values())

    for task in tasks:
        mine = [r for r in counted.requests if task in user_blocks(r)[0]["text"]]
        assert len(mine) == 4 and all(user_blocks(r)[0].get("cache_control") == {"type": "ephemeral"} for r in mine)
        leader, *others = mine
        prefix = leader.prompt_usage["cache_creation_input_tokens"] + leader.prompt_usage["cache_read_input_tokens"]
        assert leader.prompt_usage["cache_creation_input_tokens"] > 0 and prefix > 1024
        for other in others:  # sent once the leader's answer had begun: the whole prefix is a read
            assert other.prompt_usage["cache_read_input_tokens"] == prefix
            assert other.prompt_usage["cache_creation_input_tokens"] == 0
    stats = teacher.last_batch
    assert stats.cache_read_tokens == teacher.ledger.cache_read_tokens > 0 and stats.cache_write_tokens > 0
    output = teacher.ledger.output_tokens * 15 / 1e6
    cached = dollars(counted.requests, price=(3.0, 15.0), cache=(0.30, 3.75), anthropic=True) + output
    assert teacher.ledger.spent_usd == pytest.approx(cached)
    assert stats.metrics(teacher.ledger)["teacher/cost_usd"] == pytest.approx(cached)

    # the same judgements without the prompt cache: nothing marked, every token at the input price
    counted.requests.clear()
    counted.prompt_cache.clear()
    plain = make(counted, provider="anthropic", model="claude-sonnet-4-5", prompt_cache=False)
    plain.judge([r for task in tasks for r in requests(task, 4)])
    assert not any("cache_control" in block for r in counted.requests for block in user_blocks(r))
    assert plain.ledger.cache_read_tokens == plain.ledger.cache_write_tokens == 0
    assert plain.ledger.input_tokens == teacher.ledger.input_tokens
    assert teacher.ledger.spent_usd < 0.6 * plain.ledger.spent_usd


def test_a_prefix_too_short_or_read_by_no_other_call_is_not_marked_nor_waited_for(counted):
    # claude-haiku-4-5 caches only prefixes of 4,096 tokens: four short calls go out together, unmarked
    counted.hold_in_rounds(4, timeout_s=20)
    teacher = make(counted, provider="anthropic", model="claude-haiku-4-5", max_concurrency=4)
    teacher.judge(requests("Write add(a, b).", 4))
    assert counted.rounds_timed_out == 0 and counted.count() == 4
    assert not any("cache_control" in str(r.body) for r in counted.requests)

    # group mode, one call per task: the task is read by no other call, so only the system prompt is marked
    counted.hold_in_rounds(2, timeout_s=20)
    counted.requests.clear()
    grouped = make(counted, provider="anthropic", model="claude-sonnet-4-5", mode="group", max_concurrency=2)
    grouped.judge(requests(LONG_TASK, 4) + requests(LONG_TASK.replace("shift", "slide"), 4))
    assert counted.rounds_timed_out == 0 and counted.count() == 2  # neither waited for the other
    for record in counted.requests:
        assert "cache_control" not in user_blocks(record)[0]
        assert record.body["system"][0]["cache_control"] == {"type": "ephemeral"}


def test_openai_caches_the_layout_by_itself_and_the_cached_tokens_are_priced(counted):
    # gpt-4o: $2.50 input, $1.25 cached input per Mtok
    tasks = [LONG_TASK, LONG_TASK.replace("shift", "slide")]
    teacher = make(counted, provider="openai", model="gpt-4o")
    teacher.judge([r for task in tasks for r in requests(task, 4)])
    keys = {}
    for record in counted.requests:
        task = next(t for t in tasks if t in record.body["messages"][-1]["content"])
        keys.setdefault(task, set()).add(record.body["prompt_cache_key"])
    assert all(len(k) == 1 for k in keys.values()) and keys[tasks[0]] != keys[tasks[1]]  # one key per prefix
    reads = [r.prompt_usage["cached_tokens"] for r in counted.requests]
    assert sorted(reads)[:2] == [0, 0] and all(n >= 1024 and n % 128 == 0 for n in sorted(reads)[2:])
    output = teacher.ledger.output_tokens * 10 / 1e6
    cached = dollars(counted.requests, price=(2.5, 10.0), cache=(1.25, 2.5), anthropic=False) + output
    assert teacher.ledger.spent_usd == pytest.approx(cached)
    assert teacher.ledger.cache_read_tokens == sum(reads) and teacher.ledger.cache_write_tokens == 0

    counted.requests.clear()
    local = make(counted, provider="openai_compatible", model="qwen")
    local.judge(requests(LONG_TASK, 2, tag="local"))
    assert not any("prompt_cache_key" in r.body for r in counted.requests)  # local servers may reject it


def test_calls_sent_together_all_miss_and_a_later_batch_reads(counted):
    # No marks needed on OpenAI; without the prompt-cache plan nobody waits, so the first batch misses
    counted.hold_in_rounds(4, timeout_s=20)
    teacher = make(counted, provider="openai", model="gpt-5-mini", prompt_cache=False, max_concurrency=4)
    teacher.judge(requests(LONG_TASK, 4))
    assert counted.rounds_timed_out == 0 and teacher.ledger.cache_read_tokens == 0
    teacher.judge(requests(LONG_TASK, 4, tag="again"))
    assert teacher.last_batch.cache_read_tokens >= 4 * 1024


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_clients_read_the_cache_figures_from_the_usage(llm_server, provider):
    import asyncio

    llm_server.input_tokens, llm_server.cache_read_tokens, llm_server.cache_write_tokens = 100, 900, 300
    if provider == "anthropic":
        client = AnthropicClient("claude-sonnet-4-5", api_key="k", base_url=llm_server.url, max_retries=0)
    else:
        client = OpenAIClient("gpt-4o", api_key="k", base_url=llm_server.openai_url, max_retries=0)

    async def go():
        try:
            return await client.complete(system="s", prefix="shared ", user="own", schema={}, max_tokens=64)
        finally:
            await client.close()

    answer = asyncio.run(go())
    assert answer.usage == Usage(input_tokens=1300, output_tokens=30, cache_read_tokens=900, cache_write_tokens=300)
    sent = llm_server.requests[0].body["messages"][-1]["content"]
    if provider == "anthropic":  # the shared part is its own block; unmarked unless the judge marks it
        assert sent == [{"type": "text", "text": "shared "}, {"type": "text", "text": "own"}]
    else:
        assert sent == "shared own"
