"""Prices, the cost ledger and the budget."""

from __future__ import annotations

import threading
import time

import pytest

from rlaif_mlx.config import PriceConfig
from rlaif_mlx.teachers.base import Usage
from rlaif_mlx.teachers.cost import (
    PRICES,
    BudgetExceeded,
    CostLedger,
    cache_price_for,
    cost_per_1000_judgements,
    price_for,
    table_price,
)

REQUIRED = [
    "claude-opus-4-5",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "claude-3-5-haiku",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4o",
    "gpt-4o-mini",
]


def test_table_covers_current_models_with_sane_prices():
    for model in REQUIRED:
        assert model in PRICES, model
    for model, (price_in, price_out) in PRICES.items():
        assert model == model.lower() and 0 < price_in <= price_out <= 200, model
    assert PRICES["claude-sonnet-4-5"] == (3.0, 15.0)
    assert PRICES["gpt-5-mini"] == (0.25, 2.0)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("GPT-4.1-2025-04-14", "gpt-4.1"),
    ],
)
def test_dated_ids_price_as_their_model(model, expected):
    assert table_price(model) == PRICES[expected]


def test_exact_name_beats_a_shorter_prefix():
    assert table_price("gpt-4o-mini") == (0.15, 0.60) != table_price("gpt-4o")
    assert table_price("gpt-5-nano") == (0.05, 0.40) != table_price("gpt-5")
    assert table_price("claude-opus-4-5") == (5.0, 25.0) != table_price("claude-opus-4")


@pytest.mark.parametrize("model", ["gpt-5-turbo-max", "claude-opus-4-9", "gpt-4o-audio-preview", "llama-3-8b", ""])
def test_unknown_variants_are_unknown_not_guessed(model):
    # A longer id is another model, not a snapshot: pricing it as its prefix could be far off.
    assert table_price(model) is None


def test_price_for_override_local_and_unknown():
    override = PriceConfig(input=1.5, output=2.5)
    assert price_for("anthropic", "claude-haiku-4-5", override) == (1.5, 2.5)
    assert price_for("openai_compatible", "qwen2.5-coder", override) == (1.5, 2.5)
    assert price_for("openai_compatible", "gpt-4o", None) == (0.0, 0.0)
    assert price_for("anthropic", "claude-haiku-4-5-20251001", None) == (1.0, 5.0)
    assert price_for("openai", "gpt-9-ultra", None) is None


def test_ledger_records_tokens_and_dollars():
    ledger = CostLedger(price=(3.0, 15.0), budget_usd=None)
    usage = Usage(input_tokens=1_000, output_tokens=200)
    assert ledger.cost(usage) == pytest.approx(0.003 + 0.003)
    assert ledger.estimate(1_000_000, 1_000_000) == pytest.approx(18.0)
    assert ledger.calls == 0 and ledger.spent_usd == 0.0  # cost/estimate record nothing
    assert ledger.record(usage) == pytest.approx(0.006)
    ledger.record(Usage(input_tokens=500, output_tokens=0))
    assert ledger.calls == 2
    assert ledger.input_tokens == 1_500 and ledger.output_tokens == 200
    assert ledger.spent_usd == pytest.approx(0.0075)
    ledger.check()  # no budget, never raises


def test_unknown_price_without_budget_counts_tokens_only():
    ledger = CostLedger(price=None, budget_usd=None)
    assert ledger.record(Usage(100, 10)) == 0.0
    assert ledger.input_tokens == 100 and ledger.spent_usd == 0.0


def test_budget_with_unknown_price_is_refused():
    with pytest.raises(ValueError, match="teacher.prices") as info:
        CostLedger(price=None, budget_usd=5.0)
    assert "\n" not in str(info.value)


def test_budget_check_message():
    ledger = CostLedger(price=(1_000_000.0, 0.0), budget_usd=2.0)  # $1 per input token
    ledger.record(Usage(input_tokens=1))
    ledger.check()
    ledger.check(reserve_usd=1.0)  # exactly at the budget is still allowed
    with pytest.raises(BudgetExceeded, match=r"about \$1\.50 more"):
        ledger.check(reserve_usd=1.5)
    ledger.record(Usage(input_tokens=1))
    ledger.check()
    ledger.record(Usage(input_tokens=1))
    with pytest.raises(BudgetExceeded) as info:
        ledger.check()
    assert str(info.value) == "teacher budget reached: $3.00 spent of $2.00 (teacher.budget_usd)"
    assert isinstance(info.value, RuntimeError)


def test_budget_message_rounds_cents():
    ledger = CostLedger(price=(1.0, 0.0), budget_usd=2.0)
    ledger.record(Usage(input_tokens=2_010_000))
    with pytest.raises(BudgetExceeded) as info:
        ledger.check()
    assert str(info.value) == "teacher budget reached: $2.01 spent of $2.00 (teacher.budget_usd)"


def test_state_dict_round_trip_keeps_counting():
    ledger = CostLedger(price=(2.0, 8.0), budget_usd=1.0)
    ledger.record(Usage(100_000, 50_000))  # $0.60
    state = ledger.state_dict()
    assert state == {
        "spent_usd": pytest.approx(0.6),
        "input_tokens": 100_000,
        "output_tokens": 50_000,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "calls": 1,
    }
    resumed = CostLedger(price=(2.0, 8.0), budget_usd=1.0)
    resumed.load_state_dict(state)
    assert resumed.spent_usd == pytest.approx(0.6) and resumed.calls == 1
    resumed.record(Usage(100_000, 50_000))
    assert resumed.input_tokens == 200_000
    with pytest.raises(BudgetExceeded, match=r"\$1\.20 spent of \$1\.00"):
        resumed.check()


class _YieldingUsage:
    """Usage whose token counts hand the GIL to another thread when read, as I/O would."""

    output_tokens = 1
    cache_read_tokens = 0
    cache_write_tokens = 0

    @property
    def input_tokens(self) -> int:
        time.sleep(0)
        return 3


def test_ledger_is_thread_safe():
    # Without the lock, a thread switch between reading and writing a counter loses updates.
    ledger = CostLedger(price=(1.0, 2.0), budget_usd=None)
    n_threads, per_thread = 8, 500
    start = threading.Barrier(n_threads)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            ledger.record(_YieldingUsage())

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    n = n_threads * per_thread
    assert ledger.calls == n
    assert ledger.input_tokens == 3 * n and ledger.output_tokens == n
    assert ledger.spent_usd == pytest.approx(n * 5 / 1_000_000)


def test_cost_per_1000_judgements():
    # 900 input + 150 output tokens each: 0.9M * $3 + 0.15M * $15 = $4.95 for Sonnet 4.5.
    assert cost_per_1000_judgements("claude-sonnet-4-5") == pytest.approx(4.95)
    assert cost_per_1000_judgements("gpt-5-mini") == pytest.approx(0.9 * 0.25 + 0.15 * 2.0)
    assert cost_per_1000_judgements("gpt-4o-mini", input_tokens=1000, output_tokens=0) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="no built-in price"):
        cost_per_1000_judgements("mystery-model")


@pytest.mark.parametrize(
    ("provider", "model", "expected"),
    [
        ("anthropic", "claude-sonnet-5-5", (0.10, 2.50)),  # reads cut to $0.10 on 2026-10-07
        ("anthropic", "claude-opus-5-5", (0.20, 5.00)),
        ("anthropic", "claude-haiku-5-5", (0.01, 0.125)),
        ("anthropic", "claude-sonnet-4-5-20250929", (0.30, 3.75)),
        ("anthropic", "claude-3-5-haiku", (0.08, 1.00)),
        ("openai", "gpt-5-mini", (0.025, 0.25)),  # OpenAI: reads at a tenth, writes at the input price
        ("openai", "gpt-4.1", (0.50, 2.00)),
        ("openai", "gpt-4o-mini", (0.075, 0.15)),
        ("openai", "gpt-5-pro", (15.0, 15.0)),  # no cached-input price
        ("openai_compatible", "qwen", (0.0, 0.0)),
    ],
)
def test_cache_prices_follow_each_providers_rule(provider, model, expected):
    assert cache_price_for(provider, model, None) == pytest.approx(expected)


def test_cache_prices_overridden_or_unknown():
    assert cache_price_for("anthropic", "claude-sonnet-4-5", PriceConfig(input=1, output=2)) == pytest.approx(
        (0.1, 1.25)
    )  # the rule applies to the overridden input price
    override = PriceConfig(input=1, output=2, cache_read=0.5, cache_write=0.75)
    assert cache_price_for("openai_compatible", "qwen", override) == (0.5, 0.75)
    assert cache_price_for("openai", "gpt-9-ultra", None) is None
    assert cache_price_for("openai", "gpt-9-ultra", PriceConfig(input=4, output=8)) == (4.0, 4.0)


def test_ledger_prices_cache_reads_and_writes_apart_from_plain_input():
    ledger = CostLedger(price=(2.0, 10.0), budget_usd=None, cache_price=(0.1, 2.5))
    # 1,500 prompt tokens: 1,000 read from the cache, 300 written to it, 200 plain; 40 out
    usage = Usage(input_tokens=1_500, output_tokens=40, cache_read_tokens=1_000, cache_write_tokens=300)
    assert ledger.record(usage) == pytest.approx((200 * 2.0 + 1_000 * 0.1 + 300 * 2.5 + 40 * 10.0) / 1e6)
    assert ledger.cache_read_tokens == 1_000 and ledger.cache_write_tokens == 300 and ledger.input_tokens == 1_500
    # without cache prices every prompt token costs the input price, as before prompt caching
    assert CostLedger(price=(2.0, 10.0), budget_usd=None).cost(usage) == pytest.approx((1_500 * 2 + 400) / 1e6)
    resumed = CostLedger(price=(2.0, 10.0), budget_usd=None, cache_price=(0.1, 2.5))
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.cache_read_tokens == 1_000 and resumed.cache_write_tokens == 300
