"""A circuit breaker per engine replica and per remote upstream.

Closed, it counts the replica's failures in a row (connection refused or broken, a 5xx,
a timeout, a stream the engine cut); `failures` of them open it: the replica takes no
request for `open_s`, and a route's fallback answers instead. Then it is half-open: one
trial request goes through; its success closes the breaker, its failure opens it again.
Each gateway worker keeps its own breakers (they follow what that worker sees).
"""

from __future__ import annotations

import logging
from time import monotonic

from appliance.config import BreakerConfig

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
LEVELS = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the breaker state gauge's values


class Breaker:
    __slots__ = ("config", "name", "state", "failures", "opened_at", "trial_at", "on_change")

    def __init__(self, config: BreakerConfig, name: str, on_change=None):
        self.config, self.name = config, name
        self.state = CLOSED
        self.failures = 0  # in a row
        self.opened_at = 0.0
        self.trial_at: float | None = None  # half-open: when the trial request went out
        self.on_change = on_change  # called with the breaker after each change of state

    def allows(self) -> bool:
        """Whether a request may go to the replica now; half-open, only the one trial (another
        once open_s has passed with no word from it: its client may have left)."""
        if self.state == CLOSED:
            return True
        now = monotonic()
        if self.state == OPEN:
            if now - self.opened_at < self.config.open_s:
                return False
            self._become(HALF_OPEN)
        return self.trial_at is None or now - self.trial_at >= self.config.open_s

    def sent(self) -> None:
        """A request went out: half-open, it is the trial."""
        if self.state == HALF_OPEN:
            self.trial_at = monotonic()

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a trial through."""
        return max(0.0, self.opened_at + self.config.open_s - monotonic()) if self.state == OPEN else 0.0

    def succeeded(self) -> None:
        self.failures = 0
        if self.state != CLOSED:
            self._become(CLOSED)

    def failed(self, reason: str) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.config.failures):
            self.opened_at = monotonic()
            self._become(OPEN, reason)

    def _become(self, state: str, reason: str = "") -> None:
        self.state, self.trial_at = state, None
        if state == OPEN:
            log.warning("circuit breaker of %s opened after %d failure(s) in a row (last: %s); no requests for %g s",
                        self.name, self.failures, reason, self.config.open_s)
        else:
            log.info("circuit breaker of %s is %s", self.name, state)
        if self.on_change is not None:
            self.on_change(self)
