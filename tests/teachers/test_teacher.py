"""The teacher with the real SDKs against a local server: concurrency, cache, faults, budget, gate.

No mocks: ``tests/llm_server.py`` speaks the Anthropic and OpenAI wire formats
on 127.0.0.1; the cache is a real SQLite file; graders run in the real sandbox.
"""

from __future__ import annotations

import pytest
from llm_server import DEFAULT_SCORES

from rlaif_mlx.config import RewardConfig, TeacherConfig
from rlaif_mlx.data.tasks import Task
from rlaif_mlx.rewards.pipeline import RewardPipeline
from rlaif_mlx.teachers.base import JudgeRequest
from rlaif_mlx.teachers.cost import BudgetExceeded
from rlaif_mlx.teachers.judge import STOP_AFTER_FAILED_BATCHES, Teacher, TeacherUnavailable
from rlaif_mlx.teachers.rubric import weighted_score

WEIGHTS = {"correctness": 0.6, "quality": 0.15, "efficiency": 0.1, "readability": 0.15}
EXPECTED = weighted_score({k: DEFAULT_SCORES[k] / 10 for k in WEIGHTS}, WEIGHTS)


def make(server, tmp_path, *, provider: str = "openai_compatible", **overrides) -> Teacher:
    settings = {
        "provider": provider,
        "model": "judge-1",
        "max_retries": 0,
        "timeout_s": 5,
        "cache_path": str(tmp_path / "cache.sqlite"),
        "base_url": server.openai_url if provider != "anthropic" else server.url,
    } | overrides
    return Teacher(TeacherConfig(**settings))


def requests(n: int, *, prefix: str = "c") -> list[JudgeRequest]:
    return [
        JudgeRequest(
            uid=f"{prefix}{i}", prompt="Write add(a, b).", completion=f"def add(a, b):\n    return a + b  # {prefix}{i}"
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("provider", ["anthropic", "openai", "openai_compatible"])
def test_each_provider_scores_through_the_rubric(llm_server, tmp_path, monkeypatch, provider):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k-anthropic")
    monkeypatch.setenv("OPENAI_API_KEY", "k-openai")
    teacher = make(llm_server, tmp_path, provider=provider, model="gpt-4o-mini" if provider == "openai" else "m")
    got = teacher.judge(requests(2))
    assert set(got) == {"c0", "c1"}
    assert all(j.score == pytest.approx(EXPECTED) and j.error is None for j in got.values())
    assert got["c0"].criteria["correctness"] == pytest.approx(0.8)
    assert llm_server.count() == 2
    assert teacher.last_batch.calls == 2 and teacher.last_batch.failures == 0
    teacher.close()


@pytest.mark.parametrize("limit", [4, 8])
def test_requests_run_concurrently_up_to_the_limit(llm_server, tmp_path, limit):
    # No timing: the server answers in rounds of `limit` requests, each round only once all of it is in
    # flight, so fewer at a time would never fill a round. More at a time would open more connections: the
    # SDK's pool opens one only when none is idle, and every call of the first round is sent before any answer.
    teacher = make(llm_server, tmp_path, max_concurrency=limit, cache_path=None, timeout_s=60)
    llm_server.hold_in_rounds(limit)
    got = teacher.judge(requests(16))
    assert llm_server.rounds_timed_out == 0
    assert llm_server.max_in_flight == limit and llm_server.connections() == limit and llm_server.count() == 16
    assert all(j.score == pytest.approx(EXPECTED) for j in got.values())
    teacher.close()


def test_a_rerun_is_served_from_the_cache_with_zero_requests(llm_server, tmp_path):
    first = make(llm_server, tmp_path)
    paid = first.judge(requests(6))
    first.close()
    assert llm_server.count() == 6 and first.ledger.calls == 6

    again = make(llm_server, tmp_path)  # a new process would see the same file
    got = again.judge(requests(6))
    assert llm_server.count() == 6  # nothing sent
    assert all(j.cached for j in got.values()) and again.last_batch.cache_hits == 6
    assert {u: j.score for u, j in got.items()} == {u: j.score for u, j in paid.items()}
    assert again.ledger.spent_usd == 0.0
    # another rubric weighting is another judgement
    other = make(llm_server, tmp_path, rubric_weights={"correctness": 1.0})
    other.judge(requests(1))
    assert llm_server.count() == 7


def test_identical_completions_in_a_batch_share_one_call(llm_server, tmp_path):
    teacher = make(llm_server, tmp_path, cache_path=None)
    same = [JudgeRequest(uid=f"s{i}", prompt="p", completion="def f(): pass") for i in range(4)]
    got = teacher.judge(same)
    assert llm_server.count() == 1 and set(got) == {"s0", "s1", "s2", "s3"}
    assert len({j.score for j in got.values()}) == 1


def test_an_unparseable_answer_is_counted_not_scored_and_not_cached(llm_server, tmp_path):
    llm_server.answer = lambda request: "Looks fine to me!"
    teacher = make(llm_server, tmp_path)
    got = teacher.judge(requests(3))
    assert all(j.score is None and "unparseable" in j.error for j in got.values())
    assert teacher.last_batch.failures == 3 and teacher.last_batch.unparseable == 3
    assert teacher.ledger.calls == 3  # the tokens were paid for all the same
    teacher.judge(requests(3))
    assert llm_server.count() == 6  # not cached: asked again


def test_a_call_that_keeps_failing_is_left_out_and_the_run_stops_after_three_batches(llm_server, tmp_path):
    llm_server.add_fault("500", times=None, retry_after_ms=10)
    teacher = make(llm_server, tmp_path, max_retries=1)
    for batch in range(STOP_AFTER_FAILED_BATCHES - 1):
        got = teacher.judge(requests(2, prefix=f"b{batch}-"))
        assert all(j.score is None and "500" in j.error for j in got.values())
    assert llm_server.count() == 2 * 2 * (STOP_AFTER_FAILED_BATCHES - 1)  # each call retried once
    with pytest.raises(TeacherUnavailable, match="failed on every call for 3 batches"):
        teacher.judge(requests(2, prefix="last-"))


@pytest.mark.parametrize("provider", ["anthropic", "openai_compatible"])
def test_a_bug_in_the_client_propagates_instead_of_counting_as_an_api_failure(
    llm_server, tmp_path, monkeypatch, provider
):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k-anthropic")
    teacher = make(llm_server, tmp_path, provider=provider, cache_path=None)
    sdk = teacher.client._sdk
    endpoint = sdk.messages if provider == "anthropic" else sdk.chat.completions
    create = endpoint.create

    async def misspelled(**kwargs):  # a client that hands the real SDK an argument it does not take
        return await create(**kwargs, max_token=5)

    monkeypatch.setattr(endpoint, "create", misspelled)
    with pytest.raises(TypeError, match="max_token"):
        teacher.judge(requests(1))
    assert teacher.last_batch.failures == 0 and teacher.last_batch.errors == []  # not an API failure
    assert llm_server.count() == 0
    teacher.close()


def test_retries_recover_and_a_refused_key_stops_at_once(llm_server, tmp_path, monkeypatch):
    llm_server.add_fault("429", times=1, retry_after=0.2)
    teacher = make(llm_server, tmp_path, max_retries=2)
    assert teacher.judge(requests(1))["c0"].score == pytest.approx(EXPECTED)
    assert llm_server.count() == 2

    monkeypatch.setenv("ANTHROPIC_API_KEY", "k-wrong")
    llm_server.add_fault("401", times=None)
    refused = make(llm_server, tmp_path, provider="anthropic", cache_path=None)
    with pytest.raises(TeacherUnavailable, match="401"):
        refused.judge(requests(1, prefix="x"))


@pytest.mark.parametrize("concurrency", [1, 8])
def test_the_budget_stops_before_overspending_and_keeps_what_was_paid(llm_server, tmp_path, concurrency):
    # 600 input + 100 output tokens at $1000 / Mtok each: $0.70 per call
    llm_server.input_tokens, llm_server.output_tokens = 600, 100
    prices = {"input": 1000, "output": 1000}
    teacher = make(llm_server, tmp_path, prices=prices, budget_usd=2.5, max_concurrency=concurrency)
    with pytest.raises(BudgetExceeded, match=r"teacher budget reached: \$\d\.\d\d spent of \$2\.50") as stop:
        teacher.judge(requests(10))
    paid = teacher.ledger.calls
    assert llm_server.count() == paid
    assert teacher.ledger.spent_usd == pytest.approx(0.7 * paid) and teacher.ledger.spent_usd <= 2.5
    # One at a time, 3 calls fit ($2.10; a 4th would pass $2.50). Eight at a time, each call reserves
    # its expected cost before any is paid: (1696 prompt chars / 3.5 + 256 answer tokens) x $1000 / Mtok
    # = $0.74, and 3 reservations fit ($2.22) where a 4th would pass $2.50 (all before any answer comes).
    assert paid == 3
    assert f"${0.7 * paid:.2f} spent" in str(stop.value)
    with pytest.raises(BudgetExceeded):
        teacher.judge(requests(1, prefix="more"))
    assert llm_server.count() == paid  # nothing more was sent
    # what was paid for is cached: a run with a larger budget gets it for free
    richer = make(llm_server, tmp_path, prices=prices, budget_usd=50.0)
    got = richer.judge(requests(10))
    assert sum(j.cached for j in got.values()) == paid and llm_server.count() == 10


def test_the_reward_pipeline_asks_only_about_code_that_passes_the_gate(llm_server, tmp_path):
    teacher = make(llm_server, tmp_path, cache_path=None, gate="parses")
    pipeline = RewardPipeline(
        RewardConfig(weights={"parses": 0.1, "tests": 0.6, "teacher": 0.3}, test_timeout_s=5), teacher=teacher
    )
    task = Task(
        id="add",
        prompt="Write add(a, b).",
        tests="assert add(1, 2) == 3\nassert add(0, 0) == 0",
        reference="def add(a, b):\n    return a + b\n",
    )
    results = pipeline.score(
        [
            ("good", task, "```python\ndef add(a, b):\n    return a + b\n```"),
            ("wrong", task, "```python\ndef add(a, b):\n    return a - b\n```"),
            ("broken", task, "```python\ndef add(a, b) return\n```"),
        ]
    )
    assert llm_server.count() == 2  # "broken" does not parse: no call
    sent = [r.body["messages"][-1]["content"] for r in llm_server.requests]
    assert any("return a + b" in s for s in sent) and all("def add(a, b):\n    return a + b" in s for s in sent)
    assert results["broken"].components["teacher"] == 0.0
    assert results["good"].components["teacher"] == pytest.approx(EXPECTED)
    assert results["good"].reward == pytest.approx(0.1 + 0.6 + 0.3 * EXPECTED)
    assert results["wrong"].reward == pytest.approx(0.1 + 0.6 * 0.5 + 0.3 * EXPECTED)
    metrics = pipeline.metrics()
    assert metrics["teacher/calls"] == 2 and metrics["teacher/requests"] == 2

    llm_server.answer = lambda request: "no idea"
    failed = pipeline.score([("good", task, "```python\ndef add(a, b):\n    return a + b\n```")])
    assert failed["good"].reward is None and "unparseable" in failed["good"].error  # left out, not 0


def test_the_teacher_writes_a_reference_once_and_the_rubric_uses_it(llm_server, tmp_path):
    written = "def add(a, b):\n    return a + b  # the teacher's"

    def answer(request):
        schema = request["response_format"]["json_schema"]["schema"]
        return {"code": f"```python\n{written}\n```"} if "code" in schema["properties"] else dict(DEFAULT_SCORES)

    llm_server.answer = answer
    teacher = make(llm_server, tmp_path, write_reference=True, gate="always")
    pipeline = RewardPipeline(RewardConfig(weights={"tests": 0.5, "teacher": 0.5}), teacher=teacher)
    task = Task(id="add", prompt="Write add(a, b).", tests="assert add(1, 2) == 3")  # no reference of its own
    first = pipeline.score([("a", task, "def add(a, b):\n    return a + b")])
    assert first["a"].reward == pytest.approx(0.5 + 0.5 * EXPECTED)
    bodies = [r.body for r in llm_server.requests]
    assert len(bodies) == 2  # one reference, then one judgement that shows it
    assert written in bodies[1]["messages"][-1]["content"]

    pipeline.score([("b", task, "def add(a, b):\n    return b + a")])
    assert llm_server.count() == 3  # the reference was not asked for again
    fresh = RewardPipeline(
        RewardConfig(weights={"tests": 0.5, "teacher": 0.5}),
        teacher=make(llm_server, tmp_path, write_reference=True, gate="always"),
    )
    fresh.score([("c", task, "def add(a, b):\n    return a + b")])
    assert llm_server.count() == 3  # a new run: reference and judgement both come from the cache
