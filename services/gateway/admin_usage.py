"""Metered usage in the admin API: GET /admin/usage, totals with their cost, grouped and in
time buckets (appliance/analytics.py), as JSON or CSV.

Admins and operators see everyone's usage; any other role sees only its own: its user's
(every key of that user), or, for a key without a user, that key's.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Literal

from litestar import Controller, Request, Response, get

from appliance.analytics import GROUPINGS, summarize
from appliance.audit import Actor
from appliance.durations import parse_moment
from appliance.errors import InvalidRequest, PermissionDenied
from services.gateway.admin import MANAGER_ROLES, gateway_of, perform

CSV_TYPE = "text/csv; charset=utf-8"


def moment_of(text: str | None, now: float, param: str) -> float | None:
    """'all' or nothing -> None; a duration (24h: that long before `now`) or an ISO 8601 date or
    time -> Unix seconds; 400 naming `param` otherwise."""
    if text is None or text == "all":
        return None
    try:
        return parse_moment(text, now)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None


def groups_of(text: str) -> tuple[str, ...]:
    groups = tuple(dict.fromkeys(g.strip() for g in text.split(",")))
    if not all(g in GROUPINGS for g in groups):
        raise InvalidRequest(f"by must be a comma-separated list of {', '.join(GROUPINGS)}, not {text!r}", param="by")
    return groups


def as_csv(rows: list[dict], currency: str) -> str:
    """One line per row, the currency of `cost` in a column of its own."""
    out = io.StringIO()
    columns = list(rows[0]) + ["currency"] if rows else ["requests", "currency"]
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "currency": currency} for row in rows)
    return out.getvalue()


class UsageController(Controller):
    path = "/usage"
    tags = ["usage"]

    @get()
    async def usage(self, request: Request, actor: Actor, since: str = "24h", until: str | None = None,
                    by: str = "key,model", bucket: Literal["hour", "day", "month"] | None = None,
                    format: Literal["json", "csv"] = "json") -> Response:
        """Requests, errors, tokens, cost and latency from `since` until `until` (now when not given):
        each a duration before now (15m, 24h, 7d), an ISO 8601 date or time (UTC unless it says),
        or, for `since`, all. Grouped `by` any of team, user, key, model, route and template
        (comma-separated), and by `bucket` (hour, day or month, UTC) when given; as CSV with
        format=csv."""
        now = time.time()
        since_ts, until_ts = moment_of(since, now, "since"), moment_of(until, now, "until")
        if since_ts is not None and until_ts is not None and since_ts >= until_ts:
            raise InvalidRequest(f"until ({until}) must be after since ({since})", param="until")
        groups = groups_of(by)
        mine: dict[str, str | None] = {}
        if actor.role not in MANAGER_ROLES:
            if actor.user_id is None and actor.key_id is None:
                raise PermissionDenied("This caller has neither a user nor a key whose usage it may see.")
            mine = {"user_id": actor.user_id} if actor.user_id else {"key_id": actor.key_id}
        currency = gateway_of(request).runtime.costs.currency
        rows = await perform(request, actor, lambda db: summarize(db, since=since_ts, until=until_ts, by=groups,
                                                                  bucket=bucket, **mine))
        headers = {"x-request-id": actor.request_id}
        if format == "csv":
            return Response(as_csv(rows, currency).encode(), media_type=CSV_TYPE,
                            headers={**headers, "content-disposition": 'attachment; filename="usage.csv"'})
        return Response({"currency": currency, "since": since_ts, "until": until_ts, "by": list(groups),
                         "bucket": bucket, "own_only": bool(mine), "rows": rows}, headers=headers)
