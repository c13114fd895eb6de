"""What a request costs, in the profile's currency (costs.currency).

A model with prices (price_input_per_million, price_output_per_million; a remote upstream's
are the provider's, and an unset one of them is 0) costs its prices. A local model without
prices costs the machine's time: costs.hardware_per_hour spread over the tokens the model
gets through in that time at load,

    cost per token = hardware_per_hour / 3600 / tokens_per_second

the same for prompt and completion tokens, where tokens_per_second is measured by
`Throughput`. Without costs.hardware_per_hour such a model costs 0.

Throughput: the gateway feeds every settled request (its tokens and seconds). Requests are
grouped by the 60 s window in which they end; a window's rate is its tokens divided by the
time at least one of its requests was running (the union of their intervals), so an idle
machine does not look slow and parallel requests (batching) count once. The estimate is
the peak rate of the last HISTORY windows with at least MIN_BUSY_S of work, and
UNMEASURED_TOKENS_PER_S until there is one. The windows are kept in the ledger
(appliance/limits.py), shared by every gateway worker and kept across restarts.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Protocol

import msgspec

WINDOW_S = 60
HISTORY = 60  # windows with work that the peak is taken over
MIN_BUSY_S = 1.0  # a window with less work says too little
UNMEASURED_TOKENS_PER_S = 20.0
MAX_BLOCKS = 4096  # busy intervals kept per window; beyond, the closest ones merge
LOCAL_ENGINES = frozenset({"llamacpp", "vllm"})


class PricedModel(Protocol):
    name: str
    engine: str
    price_input_per_million: float | None
    price_output_per_million: float | None


class WindowState(msgspec.Struct, array_like=True):
    """One model's throughput: the open window's work and the rates of the last closed ones."""

    window: int = 0  # start // WINDOW_S
    tokens: int = 0
    blocks: list[tuple[float, float]] = []  # disjoint busy intervals, sorted
    rates: list[float] = []  # tokens per second of the last HISTORY windows with work

    def add(self, window: int, tokens: int, blocks: Iterable[tuple[float, float]]) -> None:
        if window > self.window:
            self.close()
            self.window, self.tokens, self.blocks = window, 0, []
        elif window < self.window:
            return  # work that ended in a window already closed by another worker
        self.tokens += tokens
        self.blocks = merge(self.blocks, blocks)

    def close(self) -> None:
        busy = sum(end - start for start, end in self.blocks)
        if busy >= MIN_BUSY_S and self.tokens > 0:
            self.rates = [*self.rates, self.tokens / busy][-HISTORY:]

    @property
    def estimate(self) -> float | None:
        return max(self.rates) if self.rates else None


def merge(blocks: list[tuple[float, float]], more: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of sorted disjoint `blocks` and the intervals `more`, sorted and disjoint."""
    merged = list(blocks)
    for start, end in more:
        i = bisect.bisect_left(merged, (start, start))
        if i > 0 and merged[i - 1][1] >= start:
            i -= 1
        j = i
        while j < len(merged) and merged[j][0] <= end:
            start, end = min(start, merged[j][0]), max(end, merged[j][1])
            j += 1
        merged[i:j] = [(start, end)]
    while len(merged) > MAX_BLOCKS:  # join the two closest neighbours
        k = min(range(len(merged) - 1), key=lambda n: merged[n + 1][0] - merged[n][1])
        merged[k:k + 2] = [(merged[k][0], merged[k + 1][1])]
    return merged


IDLE_GAP_S = 0.01  # a pause shorter than this between two requests counts as busy time


class Throughput:
    """Aggregate tokens per second per model, measured on settled requests.

    `record` (on the event loop) only collects; `take_pending` and `apply` move the work
    into the shared windows of the ledger and its estimates back (appliance/limits.py
    Governor.sweep, off the event loop)."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[int, tuple[int, list[tuple[float, float]]]]] = {}
        self._estimates: dict[str, float] = {}

    def record(self, model: str, tokens: int, seconds: float, now: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        windows = self._pending.setdefault(model, {})
        window = int(now // WINDOW_S)
        count, intervals = windows.get(window, (0, []))
        start = now - seconds
        if intervals and start <= intervals[-1][1] + IDLE_GAP_S:  # busy on: one interval, not one per request
            intervals[-1] = (min(intervals[-1][0], start), max(intervals[-1][1], now))
        else:
            intervals.append((start, now))
        windows[window] = (count + tokens, intervals)

    def take_pending(self) -> dict[str, dict[int, tuple[int, list[tuple[float, float]]]]]:
        pending, self._pending = self._pending, {}
        return pending

    def apply(self, estimates: dict[str, float]) -> None:
        self._estimates = estimates

    def tokens_per_second(self, model: str) -> float:
        return self._estimates.get(model, UNMEASURED_TOKENS_PER_S)


class Costs:
    """Prices per token of each model; `hardware_per_hour` and `throughput` price the rest."""

    def __init__(self, prices: dict[str, tuple[float, float]], *, hardware_per_hour: float | None = None,
                 currency: str = "USD", throughput: Throughput | None = None):
        self.prices = prices  # model -> (per input token, per output token)
        self.hardware_per_hour = hardware_per_hour
        self.currency = currency
        self.throughput = throughput or Throughput()

    @classmethod
    def from_models(cls, models: Iterable[PricedModel], *, hardware_per_hour: float | None = None,
                    currency: str = "USD") -> Costs:
        """From the profile's models (or the gateway runtime's): a remote model, or a local one with
        a price, costs its prices; any other model (deployments too) its share of the hardware."""
        prices = {}
        for m in models:
            priced = m.price_input_per_million is not None or m.price_output_per_million is not None
            if m.engine not in LOCAL_ENGINES or priced:
                prices[m.name] = ((m.price_input_per_million or 0.0) / 1e6, (m.price_output_per_million or 0.0) / 1e6)
        return cls(prices, hardware_per_hour=hardware_per_hour, currency=currency)

    def measured(self, model: str) -> bool:
        """Whether the model's price comes from the hardware's cost and its measured throughput."""
        return model not in self.prices and bool(self.hardware_per_hour)

    def per_token(self, model: str) -> tuple[float, float]:
        price = self.prices.get(model)
        if price is not None:
            return price
        if not self.hardware_per_hour:
            return 0.0, 0.0
        each = self.hardware_per_hour / 3600 / self.throughput.tokens_per_second(model)
        return each, each

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        per_input, per_output = self.per_token(model)
        return prompt_tokens * per_input + completion_tokens * per_output

    def worst_cost(self, model: str, prompt_tokens: int, max_completion_tokens: int) -> float:
        """What a request may cost at most: its prompt and every completion token it may get."""
        return self.cost(model, prompt_tokens, max_completion_tokens)
