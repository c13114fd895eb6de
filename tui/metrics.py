"""The dashboard's figures from the gateway's /metrics: rates and latency quantiles over the
last seconds, worked out from successive scrapes the way Prometheus's rate() and
histogram_quantile() work them out (a counter that went down was reset by a restart)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RATE_WINDOW_S = 10.0  # rates are over at least this long, once scrapes span it
HISTORY_S = 300.0  # how far back the scrapes (and so the sparklines) go

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    at: float  # monotonic seconds
    values: dict[tuple[str, Labels], float]

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return cls(at, values)

    def select(self, name: str, model: str | None) -> dict[Labels, float]:
        """The samples called `name`, of `model` or of every model."""
        return {labels: value for (sample, labels), value in self.values.items()
                if sample == name and (model is None or ("model", model) in labels)}

    def total(self, name: str, model: str | None = None, **match: str) -> float:
        return sum(v for labels, v in self.select(name, model).items() if all((k, w) in labels for k, w in match.items()))


@dataclass(frozen=True)
class Figures:
    """What a model (or the whole gateway) does now: rates per second, latencies in seconds;
    None where nothing happened in the window to measure."""

    requests_per_s: float = 0.0
    errors_per_s: float = 0.0
    tokens_per_s: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    in_flight: float = 0.0
    queued: float = 0.0
    cache_hit_rate: float | None = None


def _increase(now: float, then: float) -> float:
    return now if now < then else now - then  # a counter that went down was reset


def _increases(new: dict[Labels, float], old: dict[Labels, float]) -> dict[Labels, float]:
    return {labels: _increase(value, old.get(labels, 0.0)) for labels, value in new.items()}


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile: `buckets` maps each upper bound (le) to its cumulative count."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the largest finite bucket: its bound is all that is known
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


class Window:
    """The scrapes of the last HISTORY_S seconds."""

    def __init__(self) -> None:
        self.scrapes: deque[Scrape] = deque()

    def add(self, scrape: Scrape) -> None:
        self.scrapes.append(scrape)
        while self.scrapes and scrape.at - self.scrapes[0].at > HISTORY_S:
            self.scrapes.popleft()

    def _pair(self) -> tuple[Scrape, Scrape] | None:
        """The newest scrape and the newest one at least RATE_WINDOW_S older (else the oldest)."""
        if len(self.scrapes) < 2:
            return None
        new = self.scrapes[-1]
        old = next((s for s in reversed(self.scrapes) if new.at - s.at >= RATE_WINDOW_S), self.scrapes[0])
        return new, old

    def figures(self, model: str | None = None) -> Figures:
        if not self.scrapes:
            return Figures()
        latest = self.scrapes[-1]
        gauges = {"in_flight": latest.total("appliance_requests_in_flight", model),
                  "queued": latest.total("appliance_queue_depth", model)}
        pair = self._pair()
        if pair is None:
            return Figures(**gauges)
        new, old = pair
        seconds = max(new.at - old.at, 1e-9)

        def rate(name: str, **match: str) -> float:
            return _increase(new.total(name, model, **match), old.total(name, model, **match)) / seconds

        def latency(name: str, q: float) -> float | None:
            buckets: dict[float, float] = {}
            for labels, count in _increases(new.select(name, model), old.select(name, model)).items():
                bound = float(dict(labels)["le"])
                buckets[bound] = buckets.get(bound, 0.0) + count
            return quantile(q, buckets)

        hits = rate("appliance_cache_requests_total", result="hit")
        looked_up = hits + rate("appliance_cache_requests_total", result="miss") + \
            rate("appliance_cache_requests_total", result="refresh")
        return Figures(
            requests_per_s=rate("appliance_requests_total"), errors_per_s=rate("appliance_errors_total"),
            tokens_per_s=rate("appliance_tokens_total"),
            p50_s=latency("appliance_request_latency_seconds_bucket", 0.5),
            p95_s=latency("appliance_request_latency_seconds_bucket", 0.95),
            ttft_p50_s=latency("appliance_time_to_first_token_seconds_bucket", 0.5),
            ttft_p95_s=latency("appliance_time_to_first_token_seconds_bucket", 0.95),
            cache_hit_rate=hits / looked_up if looked_up else None, **gauges,
        )
