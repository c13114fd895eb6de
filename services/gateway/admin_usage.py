"""Metered usage in the admin API: GET /admin/usage, totals with their cost.

Admins and operators see everyone's usage; any other role sees only its own: its user's
(every key of that user), or, for a key without a user, that key's.
"""

from __future__ import annotations

import time

from litestar import Controller, Request, Response, get

from appliance.audit import Actor
from appliance.durations import parse_duration
from appliance.errors import InvalidRequest, PermissionDenied
from appliance.usage import GROUPINGS, summarize
from services.gateway.admin import MANAGER_ROLES, gateway_of, run


def since_of(text: str, now: float) -> float | None:
    """'all' -> None; a duration such as 24h -> that long before `now`; 400 naming `since` otherwise."""
    if text == "all":
        return None
    try:
        return now - parse_duration(text)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from None


def groups_of(text: str) -> tuple[str, ...]:
    groups = tuple(dict.fromkeys(g.strip() for g in text.split(",")))
    if not all(g in GROUPINGS for g in groups):
        raise InvalidRequest(f"by must be a comma-separated list of {', '.join(GROUPINGS)}, not {text!r}", param="by")
    return groups


class UsageController(Controller):
    path = "/usage"
    tags = ["usage"]

    @get()
    async def usage(self, request: Request, actor: Actor, since: str = "24h", by: str = "key,model") -> Response:
        """Requests, tokens, cost and latency since `since` (15m, 24h, 7d or all), grouped `by` any of
        team, user, key, model and template (comma-separated)."""
        since_ts, groups = since_of(since, time.time()), groups_of(by)
        mine: dict[str, str | None] = {}
        if actor.role not in MANAGER_ROLES:
            if actor.user_id is None and actor.key_id is None:
                raise PermissionDenied("This caller has neither a user nor a key whose usage it may see.")
            mine = {"user_id": actor.user_id} if actor.user_id else {"key_id": actor.key_id}
        currency = gateway_of(request).runtime.costs.currency
        return await run(request, actor, lambda db: {
            "currency": currency, "since": since_ts, "by": list(groups), "own_only": bool(mine),
            "rows": summarize(db, since=since_ts, by=groups, **mine),
        })
