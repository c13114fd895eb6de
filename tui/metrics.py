"""The dashboard's figures from the gateway's /metrics: rates and latency quantiles over the
last seconds, from successive scrapes (appliance/scrapes.py)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from appliance.scrapes import Scrape, increase, increases, quantile

RATE_WINDOW_S = 10.0  # rates are over at least this long, once scrapes span it
HISTORY_S = 300.0  # how far back the scrapes (and so the sparklines) go


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
            return increase(new.total(name, model, **match), old.total(name, model, **match)) / seconds

        def latency(name: str, q: float) -> float | None:
            buckets: dict[float, float] = {}
            for labels, count in increases(new.select(name, model), old.select(name, model)).items():
                bound = float(dict(labels)["le"])
                buckets[bound] = buckets.get(bound, 0.0) + count
            return quantile(q, buckets)

        hits = rate("appliance_cache_requests_total", result="hit")
        looked_up = hits + rate("appliance_cache_requests_total", result="miss") + \
            rate("appliance_cache_requests_total", result="refresh")
        return Figures(
            requests_per_s=rate("appliance_requests_total"), errors_per_s=rate("appliance_errors_total"),
            tokens_per_s=rate("appliance_tokens_total"),
            p50_s=latency("gen_ai_server_request_duration_seconds_bucket", 0.5),
            p95_s=latency("gen_ai_server_request_duration_seconds_bucket", 0.95),
            ttft_p50_s=latency("gen_ai_server_time_to_first_token_seconds_bucket", 0.5),
            ttft_p95_s=latency("gen_ai_server_time_to_first_token_seconds_bucket", 0.95),
            cache_hit_rate=hits / looked_up if looked_up else None, **gauges,
        )
