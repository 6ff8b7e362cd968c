"""The teacher: judges completions concurrently, never twice, within a budget.

``Teacher.judge`` takes a batch of requests and returns one ``Judgement`` per
uid. Per request: the score cache first (a hit costs nothing and sends
nothing); identical requests in one batch share one judgement; the rest are
sent, one call per completion (``teacher.mode: pointwise``) or one call per
task's completions side by side (``group``, ``group.py``), under the
concurrency limit, laid out for the provider's prompt cache (``plan.py``), each
call's usage priced into the ledger and its answer parsed by the rubric. A call
that finally fails, or an answer (in group mode: a label) that cannot be parsed,
gives ``score=None`` with the reason: counted, shown, and left out of the update
by the reward pipeline, never replaced by a default score. In group mode only
the completions still to judge are sent: one already in the cache is neither
sent again nor shown as context.

The SDK clients are async; the trainer is not. The teacher owns one private
event loop and runs each batch to completion on it, so the SDK's connection
pool lives on one loop for the whole run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

from rlaif_mlx.config import TeacherConfig
from rlaif_mlx.teachers import cost, group, plan, references, rubric
from rlaif_mlx.teachers.base import CallFailed, Judgement, JudgeRequest, RawAnswer, TeacherClient, Usage
from rlaif_mlx.teachers.cache import ScoreCache, judgement_key, reference_key

STOP_AFTER_FAILED_BATCHES = 3  # batches in a row in which every API call failed
_CHARS_PER_TOKEN = 3.5  # rough, for the budget's reserve before the first call
_TYPICAL_ANSWER_TOKENS = 256  # a rubric answer is scores and a short rationale
_TYPICAL_LABEL_TOKENS = 96  # a group answer's entry: a label, the scores and one sentence


class TeacherUnavailable(RuntimeError):
    """Every call failed for several batches in a row (or the key was refused): stop the run."""


@dataclass
class BatchStats:
    """What one ``judge`` call did, for the metrics and the dashboard."""

    requests: int = 0
    calls: int = 0  # API calls made (the SDK's own retries are inside one call)
    cache_hits: int = 0
    failures: int = 0  # calls that failed for good, plus answers (group mode: labels) that could not be parsed
    unparseable: int = 0
    unscored: int = 0  # requests left without a score (a failed group call leaves all of its completions)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0  # of input_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to it
    latencies_s: list[float] = field(default_factory=list)
    cost_usd: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add_usage(self, usage: Usage) -> None:
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_read_tokens += usage.cache_read_tokens
        self.cache_write_tokens += usage.cache_write_tokens

    def metrics(self, ledger: cost.CostLedger) -> dict[str, float]:
        """Flat ``teacher/*`` metrics (latency percentiles over this batch's calls)."""
        lat = sorted(self.latencies_s)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
        return {
            "teacher/requests": float(self.requests),
            "teacher/calls": float(self.calls),
            "teacher/cache_hits": float(self.cache_hits),
            "teacher/cache_hit_rate": self.cache_hits / self.requests if self.requests else float("nan"),
            "teacher/failures": float(self.failures),
            "teacher/unscored": float(self.unscored),
            "teacher/input_tokens": float(self.input_tokens),
            "teacher/output_tokens": float(self.output_tokens),
            "teacher/cache_read_tokens": float(self.cache_read_tokens),
            "teacher/cache_write_tokens": float(self.cache_write_tokens),
            "teacher/latency_p50_s": pick(0.5),
            "teacher/latency_p95_s": pick(0.95),
            "teacher/cost_usd": self.cost_usd,
            "teacher/spent_usd": ledger.spent_usd,
        }


class Teacher:
    """Rubric scoring through one provider, with the cache, the ledger and a concurrency limit.

    Args:
        config: the ``teacher`` section.
        client: the provider client (default: built from the config; tests pass their own).
    """

    def __init__(self, config: TeacherConfig, *, client: TeacherClient | None = None) -> None:
        from rlaif_mlx.teachers import providers  # imports the SDKs only when a teacher is used

        self.config = config
        self.client = client if client is not None else providers.create_client(config)
        self.cache = ScoreCache(config.cache_path, ttl_s=config.cache_ttl_s) if config.cache_path else None
        self.ledger = cost.CostLedger(
            price=cost.price_for(config.provider, config.model, config.prices),
            budget_usd=config.budget_usd,
            cache_price=cost.cache_price_for(config.provider, config.model, config.prices),
        )
        self.last_batch = BatchStats()
        self._failed_batches = 0
        self._requests_judged = 0  # for the expected cost of the next batch
        self._in_flight_usd = 0.0  # reserved for calls sent but not yet paid
        self._paid_usd = 0.0  # this process's calls: dollars per prompt character, for the next call's reserve
        self._paid_chars = 0
        self._loop = asyncio.new_event_loop()
        self._semaphore: asyncio.Semaphore | None = None

    @property
    def name(self) -> str:
        return f"{self.config.provider}/{self.config.model}"

    # ------------------------------------------------------------------ judge

    def judge(self, requests: list[JudgeRequest]) -> dict[str, Judgement]:
        """Judges every request; returns uid -> judgement.

        Raises:
            cost.BudgetExceeded: the budget is spent (before or during the batch);
                what was already paid for is cached.
            TeacherUnavailable: every call failed for several batches in a row,
                or the provider refused the key.
        """
        self.ledger.check()
        stats = BatchStats(requests=len(requests))
        self.last_batch = stats
        if not requests:
            return {}
        judgements = self._loop.run_until_complete(self._judge_all(requests, stats))
        self._requests_judged += len(requests)
        self._after_batch(stats)
        return judgements

    def check_budget(self, requests: int) -> None:
        """Raises ``BudgetExceeded`` when ``requests`` more judgements, at this run's average cost
        per judgement so far (cache hits included), would pass the budget."""
        average = self.ledger.spent_usd / self._requests_judged if self._requests_judged else 0.0
        self.ledger.check(reserve_usd=average * requests)

    async def _judge_all(self, requests: list[JudgeRequest], stats: BatchStats) -> dict[str, Judgement]:
        self._semaphore = asyncio.Semaphore(self.config.max_concurrency)
        keys = {request.uid: self._key(request) for request in requests}
        firsts: dict[str, JudgeRequest] = {}  # one judgement per distinct key in this batch
        for request in requests:
            firsts.setdefault(keys[request.uid], request)
        results: dict[str, Judgement] = {}
        todo = []
        for key, request in firsts.items():
            hit = self._cached(key, request)
            if hit is not None:
                stats.cache_hits += 1
                results[key] = hit
            else:
                todo.append((key, request))
        options = {"weights": self.config.rubric_weights, "max_tokens": self.config.max_tokens}
        if self.config.mode == "group":
            calls = plan.group_calls(todo, max_group=self.config.max_group, **options)
        else:
            calls = plan.pointwise_calls(todo, **options)
        calls = plan.mark_for_cache(
            calls, provider=self.config.provider, model=self.config.model, enabled=self.config.prompt_cache
        )
        tasks: list[asyncio.Future] = []
        for call in calls:  # a call that shares a cached prefix waits for the first call that writes it
            leader = tasks[call.follows] if call.follows is not None else None
            tasks.append(asyncio.ensure_future(self._judge_call(call, leader, stats)))
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            exc = task.exception()
            if isinstance(exc, cost.BudgetExceeded):  # say what was spent once the calls in flight were paid
                self.ledger.check(reserve_usd=self.ledger.spent_usd / max(self.ledger.calls, 1))
            if exc is not None:
                raise exc  # the trainer checkpoints and stops
            results.update(task.result())
        return {uid: _with_uid(results[key], uid) for uid, key in keys.items()}

    def _cached(self, key: str, request: JudgeRequest) -> Judgement | None:
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is None:
            return None
        seat = hit.get("group") or {}
        return Judgement(
            request.uid, hit["score"], hit["criteria"], cached=True, rationale=hit.get("rationale", ""), **seat
        )

    async def _judge_call(self, call: plan.Call, leader: asyncio.Future | None, stats: BatchStats) -> dict:
        """Sends one call and turns its answer into a judgement per key (each good one cached)."""
        if leader is not None:
            await asyncio.wait([leader])  # its answer has begun: the provider's cache holds the prefix now
        seats = [call.seat(i) for i in range(len(call.keys))]
        answer, error, latency = await self._call(call, stats)
        if answer is None:
            stats.unscored += len(call.keys)
            return {
                key: Judgement(r.uid, None, error=error, latency_s=latency, **seat)
                for key, r, seat in zip(call.keys, call.requests, seats, strict=True)
            }
        spent = self._pay(call, answer, stats)
        verdicts = self._parse(call, answer, stats)
        out = {}
        for i, (key, request, seat) in enumerate(zip(call.keys, call.requests, seats, strict=True)):
            paid = {"usage": answer.usage, "cost_usd": spent} if i == 0 else {}  # the call's cost counted once
            verdict = verdicts[key]
            if isinstance(verdict, str):
                stats.unscored += 1
                out[key] = Judgement(request.uid, None, error=verdict, latency_s=latency, **paid, **seat)
                continue
            criteria, rationale = verdict
            score = rubric.weighted_score(criteria, self.config.rubric_weights)
            if self.cache is not None:
                value = {"score": score, "criteria": criteria, "rationale": rationale}
                self.cache.put(key, "judgement", value | ({"group": seat} if seat else {}))
            out[key] = Judgement(request.uid, score, criteria, latency_s=latency, rationale=rationale, **paid, **seat)
        return out

    def _pay(self, call: plan.Call, answer: RawAnswer, stats: BatchStats) -> float:
        spent = self.ledger.record(answer.usage)
        stats.cost_usd += spent
        stats.add_usage(answer.usage)
        self._paid_usd += spent
        self._paid_chars += call.chars
        return spent

    def _parse(self, call: plan.Call, answer: RawAnswer, stats: BatchStats) -> dict[str, Any]:
        """key -> (criteria, rationale), or key -> why there is none (each one counted as a failure)."""
        try:
            if call.labels:
                solutions = [r.completion for r in call.requests]
                by_label = group.parse_group(answer, call.labels, solutions=solutions)
                verdicts = {key: by_label[label] for key, label in zip(call.keys, call.labels, strict=True)}
            else:
                verdicts = {call.keys[0]: rubric.parse_scores(answer, solution=call.requests[0].completion)}
        except rubric.UnparseableAnswer as exc:
            verdicts = {key: str(exc) for key in call.keys}
        for key, verdict in verdicts.items():
            if isinstance(verdict, str):
                verdicts[key] = f"unparseable answer: {verdict}"
                stats.failures += 1
                stats.unparseable += 1
                stats.errors.append(verdicts[key])
        return verdicts

    async def _call(self, call: plan.Call, stats: BatchStats) -> tuple[RawAnswer | None, str | None, float]:
        """One API call under the concurrency limit: (answer or None, error, latency)."""
        reserve = self._expected_cost(call)
        async with self._semaphore:
            # Calls in flight are not paid yet: count them, so concurrency cannot overshoot the budget.
            self.ledger.check(reserve_usd=self._in_flight_usd + reserve)  # BudgetExceeded before paying more
            self._in_flight_usd += reserve
            started = time.perf_counter()
            stats.calls += 1
            try:
                answer = await self.client.complete(
                    system=call.system,
                    prefix=call.prefix,
                    user=call.user,
                    schema=call.schema,
                    max_tokens=call.max_tokens,
                    cache=call.cache,
                )
            except CallFailed as exc:  # the SDK already retried what is worth retrying; anything else is a bug
                latency = time.perf_counter() - started
                stats.latencies_s.append(latency)
                stats.failures += 1
                stats.errors.append(exc.description)
                if exc.fatal:
                    raise TeacherUnavailable(f"teacher {self.name}: {exc.description}") from None
                return None, exc.description, latency
            finally:
                self._in_flight_usd -= reserve
            latency = time.perf_counter() - started
            stats.latencies_s.append(latency)
            return answer, None, latency

    def _expected_cost(self, call: plan.Call) -> float:
        """What the next call will likely cost: this process's dollars per prompt character so far, a resumed
        run's average call, or an estimate from the prompt's size."""
        if self._paid_chars:
            return self._paid_usd / self._paid_chars * call.chars
        if self.ledger.calls:
            return self.ledger.spent_usd / self.ledger.calls
        typical = _TYPICAL_LABEL_TOKENS * len(call.labels) if call.labels else _TYPICAL_ANSWER_TOKENS
        output = min(call.max_tokens, typical)
        return self.ledger.estimate(int(call.chars / _CHARS_PER_TOKEN), output)

    def _after_batch(self, stats: BatchStats) -> None:
        api_failures = stats.failures - stats.unparseable
        if stats.calls and api_failures == stats.calls:
            self._failed_batches += 1
            if self._failed_batches >= STOP_AFTER_FAILED_BATCHES:
                raise TeacherUnavailable(
                    f"teacher {self.name} failed on every call for {self._failed_batches} batches in a row "
                    f"(last error: {stats.errors[-1]}); check teacher.base_url, the model name and the key"
                )
        elif stats.calls:
            self._failed_batches = 0

    def _key(self, request: JudgeRequest) -> str:
        grouped = self.config.mode == "group"
        return judgement_key(
            provider=self.config.provider,
            model=self.config.model,
            rubric_version=group.GROUP_RUBRIC_VERSION if grouped else rubric.RUBRIC_VERSION,
            prompt=request.prompt,
            completion=request.completion,
            reference=request.reference,
            weights=self.config.rubric_weights,
        )

    # ---------------------------------------------------------- references

    def write_references(self, tasks: list[tuple[str, str]]) -> dict[str, str | None]:
        """Reference solutions written by the teacher for ``(prompt, language)`` pairs, cached.

        Returns:
            prompt -> reference code, or None where the teacher gave none (the
            rubric then judges without one).
        """
        self.ledger.check()
        stats = BatchStats(requests=len(tasks))
        result = self._loop.run_until_complete(self._write_all(tasks, stats))
        self.last_batch = stats
        return result

    async def _write_all(self, tasks: list[tuple[str, str]], stats: BatchStats) -> dict[str, str | None]:
        self._semaphore = asyncio.Semaphore(self.config.max_concurrency)

        async def one(prompt: str, language: str) -> str | None:
            key = reference_key(
                provider=self.config.provider,
                model=self.config.model,
                rubric_version=rubric.RUBRIC_VERSION,
                prompt=prompt,
                language=language,
            )
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                stats.cache_hits += 1
                return hit["reference"]
            system, user = references.reference_messages(prompt, language)
            call = plan.Call([], [], system, "", user, references.REFERENCE_SCHEMA, self.config.max_tokens)
            answer, _, _ = await self._call(call, stats)
            if answer is None:
                return None
            self._pay(call, answer, stats)
            try:
                given = (answer.data or {}).get("code")
                code = references.parse_reference(
                    given if isinstance(given, str) and given.strip() else answer.text, language
                )  # strips a fence the model put inside the field
            except rubric.UnparseableAnswer:
                stats.failures += 1
                stats.unparseable += 1
                return None
            if self.cache is not None:
                self.cache.put(key, "reference", {"reference": code})
            return code

        codes = await asyncio.gather(*(one(p, lang) for p, lang in tasks))
        return {prompt: code for (prompt, _), code in zip(tasks, codes, strict=True)}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The ledger (a resumed run keeps counting its spend) and the failure streak."""
        return {
            "ledger": self.ledger.state_dict(),
            "failed_batches": self._failed_batches,
            "requests_judged": self._requests_judged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state["ledger"])
        self._failed_batches = int(state.get("failed_batches", 0))
        self._requests_judged = int(state.get("requests_judged", 0))

    def close(self) -> None:
        """Closes the SDK client, the loop and the cache."""
        if self._loop.is_closed():
            return
        self._loop.run_until_complete(self.client.close())
        self._loop.close()
        if self.cache is not None:
            self.cache.close()


def _with_uid(judgement: Judgement, uid: str) -> Judgement:
    """A shared judgement handed to each uid that asked for it (cost counted once, on the first)."""
    if judgement.uid == uid:
        return judgement
    return replace(judgement, uid=uid, usage=Usage(), cost_usd=0.0)
