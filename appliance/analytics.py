"""Usage analytics: requests, tokens, cost, errors and latency grouped by team, user, key,
model, route and template, in hour, day or month buckets (UTC), fast at millions of rows.

The usage writer (appliance/usage.py) adds each batch of rows to the rollups in the same
transaction (migration 17): usage_hourly, usage_daily and usage_monthly, one row per bucket
and combination of team, user, key, model, route and template; and usage_hourly_teams and
usage_daily_teams, without user and key, far fewer rows, for the queries that group by
neither. A query covers its time range with the coarsest pieces that fit: raw rows for the
part of an hour at either end, hourly rows up to a day boundary, daily rows up to a month
boundary, monthly rows between. So what a query reads grows with the combinations in use,
not with the requests, and the answer is exact to the request; only beyond the raw rows'
retention (appliance/retention.py) are the ends of a range rounded to the hour.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import sqlite_utils

HOUR, DAY = 3600, 86400
BUCKETS = ("hour", "day", "month")

# Each grouping's rollup column, and the table that names its ids.
GROUPINGS = {
    "team": ("team_id", "teams"),
    "user": ("user_id", "users"),
    "key": ("key_id", "api_keys"),
    "model": ("model", None),
    "route": ("route", None),  # the route the request named, when it named one
    "template": ("template", None),  # the prompt template version ("name:version"): A/B results
}

# The measures, summed: from a rollup's own columns, or (raw) from usage rows.
MEASURES = {
    "requests": "count(*)",
    "errors": "sum(status >= 400)",
    "server_errors": "sum(status >= 500)",
    "prompt_tokens": "coalesce(sum(prompt_tokens), 0)",
    "completion_tokens": "coalesce(sum(completion_tokens), 0)",
    "total_tokens": "coalesce(sum(total_tokens), 0)",
    "cost": "coalesce(sum(cost), 0)",
    "cached": "sum(cached)",
    "saved_tokens": "coalesce(sum(saved_tokens), 0)",
    "latency_ms_sum": "coalesce(sum(latency_ms), 0)",
    "ttft_ms_sum": "coalesce(sum(ttft_ms), 0)",
    "ttft_count": "count(ttft_ms)",
    "last_ts": "max(ts)",
}
_KEY = ("team_id", "user_id", "key_id", "model", "route", "template")
TEAM_KEY = ("team_id", "model", "route", "template")  # the team rollups': no user or key
_RAW_KEY = {column: f"coalesce({column}, '')" for column in _KEY}


def _month_start(ts: float, months_later: int = 0) -> int:
    moment = datetime.fromtimestamp(ts, timezone.utc)
    year, month = divmod(moment.month - 1 + months_later, 12)
    return int(datetime(moment.year + year, month + 1, 1, tzinfo=timezone.utc).timestamp())


class Period(NamedTuple):
    """A length of time the rollups sum by (a raw usage row is the finest)."""

    floor: Callable[[float], float]  # the start of the bucket a moment is in
    following: Callable[[float], float]  # the start of the bucket after the one starting then
    bucket_sql: str  # `floor` of a usage row's ts, in SQL
    tables: tuple[str, str | None]  # the rollup by every grouping, and the one by team, model, route and template

    def ceil(self, ts: float) -> float:
        start = self.floor(ts)
        return start if start == ts else self.following(start)


PERIODS = (
    Period(lambda ts: ts, lambda ts: ts, "ts", ("usage", None)),
    Period(lambda ts: ts // HOUR * HOUR, lambda ts: ts + HOUR, f"CAST(ts / {HOUR} AS INTEGER) * {HOUR}",
           ("usage_hourly", "usage_hourly_teams")),
    Period(lambda ts: ts // DAY * DAY, lambda ts: ts + DAY, f"CAST(ts / {DAY} AS INTEGER) * {DAY}",
           ("usage_daily", "usage_daily_teams")),
    Period(_month_start, lambda ts: _month_start(ts, 1),
           "CAST(strftime('%s', ts, 'unixepoch', 'start of month') AS INTEGER)", ("usage_monthly", None)),
)


def _raw_select(bucket_sql: str, source: str, key: tuple[str, ...] = _KEY) -> str:
    """Rows of `source` (usage rows) summed into rollup rows whose bucket is `bucket_sql`."""
    return (f"SELECT {bucket_sql} AS bucket, "
            + ", ".join(f"{_RAW_KEY[column]} AS {column}" for column in key) + ", "
            + ", ".join(f"{expr} AS {name}" for name, expr in MEASURES.items())
            + f" FROM {source}")


# The batch's rows (those with ids above the one given) summed by hour and every grouping,
# once: each rollup then sums those few rows.
_BATCH_HOURS = (f"INSERT INTO temp.usage_batch_hours {_raw_select(PERIODS[1].bucket_sql, 'main.usage')} "
                "WHERE id > ? GROUP BY 1, 2, 3, 4, 5, 6, 7")
_FROM_HOURS = {  # a rollup's bucket, from an hour's
    "usage_hourly": "bucket", "usage_hourly_teams": "bucket", "usage_daily": f"bucket / {DAY} * {DAY}",
    "usage_daily_teams": f"bucket / {DAY} * {DAY}",
    "usage_monthly": "CAST(strftime('%s', bucket, 'unixepoch', 'start of month') AS INTEGER)",
}


def _upsert(table: str, key: tuple[str, ...]) -> str:
    sums = ", ".join(f"max({name})" if name == "last_ts" else f"sum({name})" for name in MEASURES)
    updates = ", ".join(f"{name} = {name} + excluded.{name}" for name in MEASURES if name != "last_ts")
    positions = ", ".join(str(i) for i in range(1, len(key) + 2))
    return (f"INSERT INTO {table} (bucket, {', '.join(key)}, {', '.join(MEASURES)}) "
            f"SELECT {_FROM_HOURS[table]}, {', '.join(key)}, {sums} FROM temp.usage_batch_hours WHERE true "
            f"GROUP BY {positions} ON CONFLICT DO UPDATE SET {updates}, last_ts = max(last_ts, excluded.last_ts)")


# Run by the usage writer once it has added a batch's rows (the first given the largest id
# before them) and emptied temp.usage_batch_hours, which has usage_hourly's columns.
ROLLUP_STATEMENTS = (_BATCH_HOURS, *(_upsert(table, key) for period in PERIODS[1:]
                                     for table, key in zip(period.tables, (_KEY, TEAM_KEY)) if table))


def _segments(lo: float | None, hi: float | None, level: int, by_team: bool) -> list[tuple[str, float | None, float | None]]:
    """[lo, hi) covered by (table, from, to) pieces: the coarsest period up to `level` (0 raw,
    1 hour, 2 day, 3 month) whose whole buckets fit, finer ones for what is left at either
    end; the team rollup of a period where `by_team` and it has one."""
    period = PERIODS[level]
    table = period.tables[1] if by_team and period.tables[1] else period.tables[0]
    if level == 0:
        return [(table, lo, hi)] if lo is None or hi is None or lo < hi else []
    start = None if lo is None else period.ceil(lo)
    end = None if hi is None else period.floor(hi)
    if start is not None and end is not None and start >= end:
        return _segments(lo, hi, level - 1, by_team)
    pieces = _segments(lo, start, level - 1, by_team) if lo is not None and lo < start else []
    pieces.append((table, start, end))
    if hi is not None and end < hi:
        pieces += _segments(end, hi, level - 1, by_team)
    return pieces


def _bucket_expression(bucket: str | None) -> str | None:
    """A piece's bucket (the start of its hour, day or month) as the start of the asked-for one."""
    if bucket is None:
        return None
    if bucket == "hour":
        return "bucket"  # every piece is hourly or finer when the buckets are hours
    if bucket == "day":
        return f"bucket / {DAY} * {DAY}"
    return "CAST(strftime('%s', bucket, 'unixepoch', 'start of month') AS INTEGER)"


def summarize(db: sqlite_utils.Database, *, since: float | None = None, until: float | None = None,
              by: tuple[str, ...] = ("key", "model"), bucket: str | None = None,
              user_id: str | None = None, key_id: str | None = None) -> list[dict]:
    """Usage totals in [since, until) grouped by any of GROUPINGS (and by `bucket`: hour, day or
    month, UTC), newest activity first (oldest bucket first); only a user's (`user_id`) or a key's
    (`key_id`) usage when given. Ids are None where a request had none (no team, no route)."""
    unknown = [group for group in by if group not in GROUPINGS]
    if unknown or not by:
        raise ValueError(f"cannot group usage by {', '.join(unknown) or 'nothing'}: use any of {', '.join(GROUPINGS)}")
    if bucket is not None and bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}, not {bucket!r}")
    groups = list(dict.fromkeys(by))
    keys = [GROUPINGS[g][0] for g in groups]
    bucket_expr = _bucket_expression(bucket)
    if bucket_expr:
        keys.insert(0, f"{bucket_expr} AS bucket")
    by_team = {GROUPINGS[g][0] for g in groups} <= set(TEAM_KEY) and user_id is None and key_id is None
    pieces, params = [], []
    for table, lo, hi in _segments(since, until, {"hour": 1, "day": 2}.get(bucket, 3), by_team):
        conditions = []
        column = "ts" if table == "usage" else "bucket"
        for condition, value in ((f"{column} >= ?", lo), (f"{column} < ?", hi), ("user_id = ?", user_id),
                                 ("key_id = ?", key_id)):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        if table == "usage":
            pieces.append(f"{_raw_select(PERIODS[1].bucket_sql, 'usage')}{where} GROUP BY 1, 2, 3, 4, 5, 6, 7")
        else:
            columns = ", ".join(c if c in TEAM_KEY or not table.endswith("_teams") else f"'' AS {c}" for c in _KEY)
            pieces.append(f"SELECT bucket, {columns}, {', '.join(MEASURES)} FROM {table}{where}")
    summed = ", ".join(f"max({name}) AS {name}" if name == "last_ts" else f"sum({name}) AS {name}"
                       for name in MEASURES)
    group_by = ", ".join(str(i) for i in range(1, len(keys) + 1))  # by position: "bucket" is also a column
    named = [(g, *GROUPINGS[g]) for g in groups if GROUPINGS[g][1]]
    joins = " ".join(f"LEFT JOIN {table} {g}s ON {g}s.id = g.{column}" for g, column, table in named)
    # The answer's columns, shaped here rather than row by row in Python: '' (the rollups' "none")
    # as null, averages from the sums, the bucket as an ISO time.
    shown = ["strftime('%Y-%m-%dT%H:%M:%SZ', g.bucket, 'unixepoch') AS bucket"] if bucket_expr else []
    for group, column, table in ((g, *GROUPINGS[g]) for g in groups):
        shown.append(f"nullif(g.{column}, '') AS {column}")
        if table:
            shown.append(f"{group}s.name AS {group}_name")
    shown += [f"g.{name}" for name in MEASURES if name not in ("cost", "latency_ms_sum", "ttft_ms_sum", "ttft_count")]
    shown += ["round(g.cost, 9) AS cost", "round(g.latency_ms_sum / g.requests, 1) AS avg_latency_ms",
              "round(g.ttft_ms_sum / nullif(g.ttft_count, 0), 1) AS avg_ttft_ms"]
    sql = f"""
        WITH g AS (
            SELECT {', '.join(keys)}, {summed}
            FROM ({' UNION ALL '.join(pieces)})
            GROUP BY {group_by}
        )
        SELECT {', '.join(shown)}
        FROM g {joins}
        ORDER BY {'g.bucket, ' if bucket_expr else ''}g.last_ts DESC
    """
    cursor = db.execute(sql, params)
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]
