"""What the teacher costs: a price table, the run's ledger and its budget.

Dollars are computed from the token counts each API response reports
(``Usage``) and a price per million tokens: ``teacher.prices`` when set, else
the built-in table below. Prompt-cache reads and writes have prices of their own
(``cache_price_for``): Anthropic bills a read at a tenth of the input price (a
twentieth on Sonnet and Opus 5.5) and a 5-minute write at 1.25x; OpenAI bills a
cached read at a tenth (GPT-5), a quarter (GPT-4.1) or half (GPT-4o) and a write
as plain input. A budget (``teacher.budget_usd``) is checked before each batch of
calls; when it would be passed the trainer checkpoints and stops with
``BudgetExceeded``'s message. Stdlib only.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

from .base import Usage

if TYPE_CHECKING:  # config imports pydantic; cost.py stays cheap to import
    from ..config import PriceConfig

# USD per million (input, output) tokens, standard (not batch, not cached-input)
# rates for prompts of ordinary length. Checked 2026-11-25 against stored copies of:
#   https://platform.claude.com/docs/en/docs/about-claude/pricing  (Claude 3.x-4.6)
#   https://platform.claude.com/docs/en/models/opus-5/overview, .../sonnet-5/overview,
#   .../sonnet-5-5/overview, .../opus-5-5/overview                  (Claude 5.x)
#   https://developers.openai.com/api/docs/pricing and the model pages
#   https://developers.openai.com/api/docs/models/gpt-5-mini, .../gpt-5-nano, .../gpt-4o-*
# Prices change: set teacher.prices to override the table for your model.
PRICES: dict[str, tuple[float, float]] = {
    # Anthropic
    "claude-opus-5-5": (4.00, 20.00),
    "claude-opus-5": (5.00, 25.00),
    "claude-opus-4-8": (5.00, 25.00),
    "claude-opus-4-7": (5.00, 25.00),
    "claude-opus-4-6": (5.00, 25.00),
    "claude-opus-4-5": (5.00, 25.00),
    "claude-opus-4-1": (15.00, 75.00),
    "claude-opus-4-0": (15.00, 75.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-sonnet-5-5": (2.00, 10.00),
    "claude-sonnet-5": (2.00, 10.00),
    "claude-sonnet-4-6": (3.00, 15.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-sonnet-4-0": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    # Haiku 5.5 bills 5x for prompts over 100k tokens; judge prompts are ~1k.
    "claude-haiku-5-5": (0.10, 0.50),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-haiku": (0.25, 1.25),
    # OpenAI
    "gpt-5.4": (2.50, 15.00),
    "gpt-5.4-mini": (0.75, 4.50),
    "gpt-5.4-nano": (0.20, 1.25),
    "gpt-5.2": (1.75, 14.00),
    "gpt-5.1": (1.25, 10.00),
    "gpt-5-pro": (15.00, 120.00),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
}

# Prompt-cache prices as multiples of the input price: (read, write), the first matching id prefix wins.
# Checked 2026-11-25 against the same pages as PRICES, and for Sonnet 5.5 the cache-read cut of 2026-10-07
# ($0.20 -> $0.10 per MTok, .../sonnet-5-5/migration-guide); Opus 5.5 reads are $0.20 (.../opus-5-5/overview).
# Anthropic writes are the 5-minute rate (we never ask for the 1-hour cache). OpenAI writes cost plain input.
CACHE_MULTIPLIERS: tuple[tuple[str, float, float], ...] = (
    ("claude-sonnet-5-5", 0.05, 1.25),
    ("claude-opus-5-5", 0.05, 1.25),
    ("claude-", 0.10, 1.25),
    ("gpt-5-pro", 1.0, 1.0),  # no cached-input price: billed as input
    ("gpt-5", 0.10, 1.0),
    ("gpt-4.1", 0.25, 1.0),
    ("gpt-4o", 0.50, 1.0),
)

# What may follow a known id: a snapshot date (-20250929, -2024-08-06, @20250929),
# "-latest", and Bedrock's "-v1:0". Anything else (gpt-5-pro after gpt-5,
# claude-opus-4-7 after claude-opus-4) is another model, priced only if listed.
_SNAPSHOT = re.compile(r"^(?:[-@](?:\d{8}|\d{4}-\d{2}-\d{2}))?(?:-latest)?(?:-v\d+(?::\d+)?)?$")


def table_price(model: str) -> tuple[float, float] | None:
    """The built-in price of a model id: exact match, else the longest listed id plus a snapshot suffix.

    Args:
        model: e.g. ``claude-sonnet-4-5`` or ``gpt-4o-2024-08-06``.

    Returns:
        (input, output) USD per million tokens, or None when the table does not know the model.
    """
    name = model.strip().lower()
    if name in PRICES:
        return PRICES[name]
    known = [k for k in PRICES if name.startswith(k) and _SNAPSHOT.match(name[len(k) :])]
    return PRICES[max(known, key=len)] if known else None


def price_for(provider: str, model: str, override: PriceConfig | None) -> tuple[float, float] | None:
    """The price the ledger uses for a teacher.

    Args:
        provider: the teacher's provider.
        model: the teacher's model id.
        override: ``teacher.prices``, which wins when given.

    Returns:
        (input, output) USD per million tokens; (0, 0) for a local ``openai_compatible``
        server unless overridden; None when the price is unknown.
    """
    if override is not None:
        return float(override.input), float(override.output)
    if provider == "openai_compatible":
        return 0.0, 0.0
    return table_price(model)


def cache_price_for(provider: str, model: str, override: PriceConfig | None) -> tuple[float, float] | None:
    """The price of prompt-cache reads and writes for a teacher.

    Args:
        provider: the teacher's provider.
        model: the teacher's model id.
        override: ``teacher.prices``; its ``cache_read`` / ``cache_write`` win when given, and
            its ``input`` is the base the table's multipliers apply to.

    Returns:
        (cache read, cache write) USD per million tokens; None when the input price is
        unknown. A model the multiplier table does not know pays the input price for both.
    """
    price = price_for(provider, model, override)
    if price is None:
        return None
    name = model.strip().lower()
    read, write = next(((r, w) for prefix, r, w in CACHE_MULTIPLIERS if name.startswith(prefix)), (1.0, 1.0))
    read, write = price[0] * read, price[0] * write
    if override is not None:
        read = float(override.cache_read) if override.cache_read is not None else read
        write = float(override.cache_write) if override.cache_write is not None else write
    return read, write


class BudgetExceeded(RuntimeError):
    """The teacher's spend reached ``teacher.budget_usd``; the run stops after a checkpoint."""


class CostLedger:
    """Tokens and dollars the teacher has used in this run, and the budget they count against.

    Thread-safe: ``record`` may be called from many threads at once.

    Args:
        price: (input, output) USD per million tokens, or None when unknown (dollars then stay 0).
        budget_usd: the most this run may spend on the teacher, or None for no cap.
        cache_price: (cache read, cache write) USD per million tokens; None prices both as input.

    Raises:
        ValueError: a budget is set but the price is unknown.
    """

    def __init__(
        self,
        *,
        price: tuple[float, float] | None,
        budget_usd: float | None,
        cache_price: tuple[float, float] | None = None,
    ) -> None:
        if budget_usd is not None and price is None:
            raise ValueError(
                "teacher.budget_usd is set but this teacher model has no known price; "
                "set teacher.prices: {input: ..., output: ...} (USD per million tokens)"
            )
        self.price = price
        self.budget_usd = budget_usd
        self.cache_price = cache_price
        self._lock = threading.Lock()
        self._spent_usd = 0.0
        self._input_tokens = 0
        self._output_tokens = 0
        self._cache_read_tokens = 0
        self._cache_write_tokens = 0
        self._calls = 0

    def cost(self, usage: Usage) -> float:
        """What one call's tokens cost in USD (0 when the price is unknown).

        Input tokens the prompt cache served or stored are priced at the cache's rates,
        the rest at the input rate.
        """
        if self.price is None:
            return 0.0
        price_in, price_out = self.price
        price_read, price_write = self.cache_price if self.cache_price is not None else (price_in, price_in)
        read, write = usage.cache_read_tokens, usage.cache_write_tokens
        plain = max(0, usage.input_tokens - read - write)
        total = plain * price_in + read * price_read + write * price_write + usage.output_tokens * price_out
        return total / 1_000_000

    def estimate(self, input_tokens: int, output_tokens: int) -> float:
        """What a call of this size would cost in USD."""
        return self.cost(Usage(input_tokens=input_tokens, output_tokens=output_tokens))

    def record(self, usage: Usage) -> float:
        """Adds one API call's tokens and dollars to the ledger.

        Returns:
            The call's cost in USD.
        """
        dollars = self.cost(usage)
        with self._lock:
            self._spent_usd += dollars
            self._input_tokens += usage.input_tokens
            self._output_tokens += usage.output_tokens
            self._cache_read_tokens += usage.cache_read_tokens
            self._cache_write_tokens += usage.cache_write_tokens
            self._calls += 1
        return dollars

    @property
    def spent_usd(self) -> float:
        """USD spent so far (a resumed run includes its earlier spend)."""
        return self._spent_usd

    @property
    def input_tokens(self) -> int:
        return self._input_tokens

    @property
    def output_tokens(self) -> int:
        return self._output_tokens

    @property
    def cache_read_tokens(self) -> int:
        """Input tokens read from the provider's prompt cache (part of ``input_tokens``)."""
        return self._cache_read_tokens

    @property
    def cache_write_tokens(self) -> int:
        """Input tokens written to the provider's prompt cache (part of ``input_tokens``)."""
        return self._cache_write_tokens

    @property
    def calls(self) -> int:
        """API calls recorded (cache hits are not calls)."""
        return self._calls

    def check(self, reserve_usd: float = 0.0) -> None:
        """Raises when spending ``reserve_usd`` more would pass the budget.

        Args:
            reserve_usd: what the next batch of calls is expected to cost.

        Raises:
            BudgetExceeded: with a message for the person running the job.
        """
        if self.budget_usd is None:
            return
        spent = self._spent_usd
        if spent + reserve_usd > self.budget_usd:
            upcoming = f", the next calls need about ${reserve_usd:.2f} more" if reserve_usd > 0 else ""
            raise BudgetExceeded(
                f"teacher budget reached: ${spent:.2f} spent of ${self.budget_usd:.2f}{upcoming} (teacher.budget_usd)"
            )

    def state_dict(self) -> dict[str, Any]:
        """The counters, for a checkpoint (price and budget come from the config)."""
        with self._lock:
            return {
                "spent_usd": self._spent_usd,
                "input_tokens": self._input_tokens,
                "output_tokens": self._output_tokens,
                "cache_read_tokens": self._cache_read_tokens,
                "cache_write_tokens": self._cache_write_tokens,
                "calls": self._calls,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the counters saved by ``state_dict`` so a resumed run keeps counting."""
        with self._lock:
            self._spent_usd = float(state.get("spent_usd", 0.0))
            self._input_tokens = int(state.get("input_tokens", 0))
            self._output_tokens = int(state.get("output_tokens", 0))
            self._cache_read_tokens = int(state.get("cache_read_tokens", 0))
            self._cache_write_tokens = int(state.get("cache_write_tokens", 0))
            self._calls = int(state.get("calls", 0))


def cost_per_1000_judgements(model: str, *, input_tokens: int = 900, output_tokens: int = 150) -> float:
    """USD for 1,000 judgements of a typical size with a model from the built-in table.

    Args:
        model: a model id the table knows.
        input_tokens: prompt tokens per judgement (system + task + reference + completion).
        output_tokens: answer tokens per judgement (the scores and a short rationale).

    Returns:
        The cost of 1,000 such calls in USD.

    Raises:
        ValueError: the table has no price for the model.
    """
    price = table_price(model)
    if price is None:
        raise ValueError(f"no built-in price for {model!r}; known: {', '.join(sorted(PRICES))}")
    return 1000 * (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000
