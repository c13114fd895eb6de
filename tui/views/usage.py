"""Usage and cost (GET /admin/usage): totals over a period, grouped by team, user, key, model,
route or a pair of them, costliest first, or per hour, day or month (UTC), newest first; with a
totals line and a bar chart of the top rows' cost or tokens. A caller below operator sees only
its own usage, and the heading says so."""

from __future__ import annotations

import re
from collections.abc import Sequence

from textual.binding import Binding
from textual.widgets import Static

from tui import format as fmt
from tui.modals import DetailScreen, as_yaml
from tui.view import TableView
from tui.widgets import BarChart, Column, ResourceTable

PERIODS = ("15m", "1h", "24h", "7d", "30d", "all")
GROUPINGS = (("team",), ("user",), ("key",), ("model",), ("route",), ("team", "model"), ("user", "model"),
             ("key", "model"), ("route", "model"))
GROUP_FIELDS = {"team": ("team_name", "team_id"), "user": ("user_name", "user_id"), "key": ("key_name", "key_id"),
                "model": ("model", "model"), "route": ("route", "route")}  # (shown, identity) of each grouping's row fields
BUCKETS = (None, "hour", "day", "month")
BUCKET_WORDS = {"hour": "hour", "hourly": "hour", "day": "day", "daily": "day", "month": "month", "monthly": "month"}
BUCKET_SHOWN = {"hour": 16, "day": 10, "month": 7}  # characters of the bucket's ISO time shown: 2026-12-03T15:00
CHART_ROWS = 10


def group_name(row: dict, group: str) -> str:
    shown, identity = GROUP_FIELDS[group]
    return fmt.text(row.get(shown) or row.get(identity))


def milliseconds(value: float | None) -> str:
    return fmt.seconds(None if value is None else value / 1000)


def bucket_name(row: dict, bucket: str) -> str:
    return row["bucket"][:BUCKET_SHOWN[bucket]].replace("T", " ")


def columns_for(by: Sequence[str], currency: str, bucket: str | None = None) -> tuple[Column, ...]:
    groups = tuple(Column(group, group.upper(), lambda r, g=group: group_name(r, g)) for group in by)
    if bucket is not None:
        groups = (Column("bucket", bucket.upper(), lambda r: bucket_name(r, bucket)), *groups)
    return groups + (
        Column("requests", "REQUESTS"), Column("errors", "ERRORS"), Column("prompt_tokens", "PROMPT TOK"),
        Column("completion_tokens", "COMPLETION TOK"), Column("total_tokens", "TOKENS"),
        Column("cost", "COST", lambda r: fmt.money(r["cost"], currency)), Column("cached", "CACHED"),
        Column("avg_latency_ms", "AVG LATENCY", lambda r: milliseconds(r["avg_latency_ms"])),
        Column("avg_ttft_ms", "AVG TTFT", lambda r: milliseconds(r["avg_ttft_ms"])),
        Column("last_ts", "LAST", lambda r: fmt.age(r.get("last_ts"))),
    )


class UsageView(TableView):
    TITLE = "usage"
    REFRESH_S = 10.0
    BINDINGS = [
        Binding("p", "next_period", "Period"),
        *(Binding(str(i + 1), f"period({i})", "Period 15m 1h 24h 7d 30d all", key_display="1-6", show=False)
          for i in range(len(PERIODS))),
        Binding("b", "next_grouping", "Group by"),
        Binding("u", "next_bucket", "Per hour/day/month"),
        Binding("t", "toggle_chart", "Chart cost/tokens"),
    ]

    def __init__(self, argument: str = "") -> None:
        """`argument`: a period (like 7d, or all), a grouping (like team+model), a bucket (hourly,
        daily, monthly), and any other words the table's first filter."""
        self.period, self.by, self.bucket, words = "24h", ("key", "model"), None, []
        for word in argument.split():
            groups = tuple(word.replace(",", "+").split("+"))
            if word in BUCKET_WORDS:
                self.bucket = BUCKET_WORDS[word]
            elif all(group in GROUP_FIELDS for group in groups):
                self.by = groups
            elif word == "all" or re.fullmatch(r"[\d.]+[smhd]", word):
                self.period = word
            else:
                words.append(word)
        super().__init__(" ".join(words))
        self.chart_tokens = False
        self.answer: dict = {"by": list(self.by), "currency": "", "bucket": self.bucket, "own_only": False}

    def body(self):
        yield ResourceTable(columns_for(self.by, "", self.bucket), self.key, filter=self.first_filter, id="table")
        yield Static(id="usage-totals")
        yield BarChart(id="usage-chart")

    def key(self, row: dict) -> str:
        return "|".join([row.get("bucket", ""), *(str(row.get(GROUP_FIELDS[group][1])) for group in self.answer["by"])])

    def row_title(self, row: dict) -> str:
        """The row's groups (and bucket), for the chart and the detail's title."""
        names = [group_name(row, g) for g in self.answer["by"]]
        return " · ".join([bucket_name(row, self.answer["bucket"]), *names] if self.answer["bucket"] else names)

    def heading(self) -> str:
        period = "all time" if self.period == "all" else f"last {self.period}"
        text = f"usage · {period} · by {'+'.join(self.by)}" + (f" · per {self.bucket} (UTC)" if self.bucket else "")
        if self.answer["currency"]:
            text += f" · cost in {self.answer['currency']}"
        return text + (" · your own usage only" if self.answer["own_only"] else "")

    async def fetch(self) -> list[dict]:
        query = {"since": self.period, "by": ",".join(self.by)} | ({"bucket": self.bucket} if self.bucket else {})
        answer = await self.api.get("/admin/usage", **query)
        shape = (tuple(answer["by"]), answer["currency"], answer["bucket"])
        if shape != (tuple(self.answer["by"]), self.answer["currency"], self.answer["bucket"]):
            self.table.set_columns(columns_for(*shape))
        self.answer = answer
        rows = sorted(answer["rows"], key=lambda r: (-r["cost"], -r["total_tokens"]))
        return sorted(rows, key=lambda r: r["bucket"], reverse=True) if answer["bucket"] else rows

    def rows_shown(self) -> None:
        super().rows_shown()
        self.show_summary(list(self.table.rows_by_key.values()))

    def show_summary(self, rows: list[dict]) -> None:
        """The totals line and the chart, of the rows shown (the filter applied)."""
        currency = self.answer["currency"]

        def total(field: str) -> float:
            return sum(r[field] or 0 for r in rows)

        requests = total("requests")
        latency = sum((r["avg_latency_ms"] or 0) * r["requests"] for r in rows) / requests if requests else None
        self.query_one("#usage-totals", Static).update(
            f"{'shown' if self.table.filter else 'total'}: requests {requests}, errors {total('errors')}, "
            f"tokens {total('prompt_tokens')} prompt + {total('completion_tokens')} completion = "
            f"{total('total_tokens')}, cost {fmt.money(total('cost'), currency)}, from the cache {total('cached')}, "
            f"avg latency {milliseconds(latency)}")
        by_tokens = self.chart_tokens or not any(r["cost"] for r in rows)  # no prices set: tokens
        hint = "t: cost" if self.chart_tokens else "no cost recorded" if by_tokens else "t: tokens"
        what = "tokens" if by_tokens else "cost"
        top = sorted(rows, key=lambda r: -r["total_tokens" if by_tokens else "cost"])[:CHART_ROWS]
        bars = [(self.row_title(r), r["total_tokens"] if by_tokens else r["cost"],
                 f"{r['total_tokens']} tok" if by_tokens else fmt.money(r["cost"], currency)) for r in top]
        empty = "no tokens recorded" if rows else "no usage in this period"
        self.query_one(BarChart).show(f"top {len(bars)} by {what} ({hint})", bars, empty)

    def action_next_period(self) -> None:
        index = PERIODS.index(self.period) + 1 if self.period in PERIODS else 0
        self.action_period(index % len(PERIODS))

    def action_period(self, index: int) -> None:
        self.period = PERIODS[index]
        self.rows_shown()
        self.reload()

    def action_next_grouping(self) -> None:
        index = GROUPINGS.index(self.by) + 1 if self.by in GROUPINGS else 0
        self.by = GROUPINGS[index % len(GROUPINGS)]
        self.rows_shown()
        self.reload()

    def action_next_bucket(self) -> None:
        self.bucket = BUCKETS[(BUCKETS.index(self.bucket) + 1) % len(BUCKETS)]
        self.rows_shown()
        self.reload()

    def action_toggle_chart(self) -> None:
        self.chart_tokens = not self.chart_tokens
        self.rows_shown()

    async def open(self, row: dict) -> None:
        title = self.row_title(row)
        detail = row | {"currency": self.answer["currency"], "last": fmt.when(row.get("last_ts"))}
        await self.app.push_screen(DetailScreen(f"usage of {title}", as_yaml(detail)))
