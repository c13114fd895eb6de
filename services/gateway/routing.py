"""What answers a request for a name: the route's targets and fallbacks (appliance/routes.py),
and how often the gateway may try again.

A route picks one target by weight; when it fails before its answer started, the route's
other targets are tried (heaviest first), then its fallbacks in order. Every attempt after
the first is paid from a retry budget (Finagle's): each request adds `budget_ratio` of a
retry, and `min_per_s` more accrue each second, so an upstream that fails every request gets
at most about (1 + budget_ratio) times the traffic, not double or triple. An attempt on a
replica this request already failed on waits a jittered, doubling backoff first.
"""

from __future__ import annotations

import bisect
import itertools
import random
from time import monotonic

from appliance.config import RetryConfig, RouteSpec
from appliance.routes import shares

BUDGET_BURST = 10.0  # retries the budget holds at most: a burst of failures is not retried unboundedly


class Route:
    """A route compiled for the hot path."""

    __slots__ = ("spec", "_models", "_cumulative", "_total", "_orders")

    def __init__(self, spec: RouteSpec):
        self.spec = spec
        weighted = [t for t in spec.targets if t.weight > 0]
        self._models = [t.model for t in weighted]
        self._cumulative = list(itertools.accumulate(t.weight for t in weighted))
        self._total = self._cumulative[-1]
        by_weight = sorted(weighted, key=lambda t: -t.weight)
        # The attempt order when each target is the one chosen: the others heaviest first, then the fallbacks.
        self._orders = {
            t.model: (t.model, *(o.model for o in by_weight if o is not t), *spec.fallbacks) for t in weighted
        }

    def choose(self) -> tuple[str, ...]:
        """The models to try, in order: one target drawn by weight first."""
        first = self._models[bisect.bisect_right(self._cumulative, random.random() * self._total)] \
            if len(self._models) > 1 else self._models[0]
        return self._orders[first]


class RetryBudget:
    def __init__(self, config: RetryConfig):
        self.config = config
        self.balance = BUDGET_BURST
        self._refilled = monotonic()

    def deposit(self) -> None:
        """One request: a share of a retry."""
        self.balance = min(BUDGET_BURST, self.balance + self.config.budget_ratio)

    def withdraw(self) -> bool:
        """One retry, if the budget has it."""
        now = monotonic()
        self.balance = min(BUDGET_BURST, self.balance + (now - self._refilled) * self.config.min_per_s)
        self._refilled = now
        if self.balance < 1 - 1e-9:  # five deposits of 0.2 make a retry, rounding and all
            return False
        self.balance -= 1
        return True

    def backoff(self, tries: int) -> float:
        """Seconds to wait before the `tries`-th try of one replica (2nd, 3rd, ...): full jitter."""
        return random.uniform(0, min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (tries - 2)))


def route_readiness(route: Route, pool_of) -> dict:
    """A route's entry in /readyz: its targets' shares and fallbacks, each with whether it can answer now."""
    def state(model: str) -> str:
        pool = pool_of(model)
        if pool is None:
            return "not served"
        return "ready" if any(r.healthy and r.breaker.state != "open" for r in pool.replicas) else "unavailable"

    return {
        "targets": [{"model": t.model, "share": share, "state": state(t.model)}
                    for t, share in zip(route.spec.targets, shares(route.spec))],
        "fallbacks": [{"model": m, "state": state(m)} for m in route.spec.fallbacks],
    }
