"""What a key's or team's budget has spent this period, as the admin API shows it beside the
budget: the ledger's own figures (appliance/limits.py), the ones admission checks.

`tokens` and `cost` are what settled requests used this period (calendar day or month,
UTC); `reserved_tokens` and `reserved_cost` what is held beyond that: the worst cases of
requests in flight, and the room other gateway workers' leases took. One worker reads them
after giving back its own leases, so its own settled requests are all in `tokens`. Another
worker's settled request is in `reserved_tokens`, not yet in `tokens`, until that worker
gives back what its lease holds: at its next ledger transaction, else its housekeeping
tick once the lease has expired; at most LEASE_S plus a tick (about 1.5 s) after the
request settled. So tokens <= what settled requests used <= tokens + reserved_tokens, at
every moment (but for a worker killed with a lease open: its lease counts as spent in
full). A budget set in the middle of a period counts from when the ledger first counted
the key or team (it counts only those with limits).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from appliance.governance import Limits
from appliance.limits import Clock, Counter, Governor

COST_DIGITS = 9  # costs to a billionth of the currency: no float dust from summing them


class Spend(msgspec.Struct, kw_only=True):
    period: str  # day or month, UTC
    period_start: int  # Unix seconds
    period_end: int  # when it resets
    tokens: int
    cost: float
    reserved_tokens: int
    reserved_cost: float
    budget_tokens: int | None
    budget_cost: float | None
    currency: str  # of cost and budget_cost: the profile's costs.currency


def budgeted(limits: Limits) -> bool:
    return limits.budget_tokens is not None or limits.budget_cost is not None


def spend_of(limits: Limits, counter: Counter, clock: Clock, currency: str) -> Spend:
    tokens, cost = counter.spent(limits.period)
    return Spend(period=limits.period, period_start=int(clock.period_start(limits.period)),
                 period_end=int(clock.period_end(limits.period)), tokens=tokens, cost=round(cost, COST_DIGITS),
                 reserved_tokens=counter.reserved_tokens, reserved_cost=round(counter.reserved_cost, COST_DIGITS),
                 budget_tokens=limits.budget_tokens, budget_cost=limits.budget_cost, currency=currency)


def spending(governor: Governor, owners: Sequence[tuple[str, Limits]], currency: str,
             now: float | None = None) -> list[Spend | None]:
    """The spend of each (ledger subject, limits) whose limits set a budget, None for the others;
    one read of the ledger for them all. Blocking: call it off the event loop."""
    clock = Clock(time.time() if now is None else now)
    wanted = [subject for subject, limits in owners if budgeted(limits)]
    counters = governor.usages(wanted, clock.now) if wanted else {}
    return [spend_of(limits, counters[subject], clock, currency) if budgeted(limits) else None
            for subject, limits in owners]

