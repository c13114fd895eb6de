"""Prometheus text scraped at moments: its samples, and how counters and histograms changed
between two scrapes, worked out the way Prometheus's increase() and histogram_quantile() work
them out (a counter that went down was reset by a restart). The console's dashboard and the
gateway's alert rules read /metrics with these."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

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
                if sample == name and (model is None or ("model", model) in labels
                                       or ("gen_ai_request_model", model) in labels)}

    def total(self, name: str, model: str | None = None, **match: str) -> float:
        return sum(v for labels, v in self.select(name, model).items() if all((k, w) in labels for k, w in match.items()))

    def by(self, name: str, label: str, keep: Callable[[dict[str, str]], bool] = lambda _: True) -> dict[str, float]:
        """The samples called `name` that `keep` keeps, summed by the value of `label`."""
        sums: dict[str, float] = {}
        for (sample, labels), value in self.values.items():
            named = dict(labels)
            if sample == name and label in named and keep(named):
                sums[named[label]] = sums.get(named[label], 0.0) + value
        return sums


def increase(now: float, then: float) -> float:
    return now if now < then else now - then  # a counter that went down was reset


def increases(new: dict[Labels, float], old: dict[Labels, float]) -> dict[Labels, float]:
    return {labels: increase(value, old.get(labels, 0.0)) for labels, value in new.items()}


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
