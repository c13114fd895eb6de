"""The usage view against the real gateway: keys of this test make real requests, and the view
shows their request and token counts as the API answered them; period and grouping keys
change the query; the bar chart draws the top rows; a non-manager sees its own usage only;
a bad period is the API's refusal as a notification."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from tests.tui.conftest import WAIT_S, cells, column, make_key, notes, until
from tui.modals import DetailScreen
from tui.views.usage import GROUPINGS, UsageView
from tui.widgets import BarChart

pytestmark = [pytest.mark.stack, pytest.mark.anyio]

MODEL = "smollm2-135m-instruct"


def ask(stack, key: str, model: str, times: int) -> dict[str, int]:
    """`times` small chat requests; the token counts the API returned for them, summed."""
    used = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for _ in range(times):
        answer = stack.client(key).chat.completions.create(
            model=model, max_tokens=4,
            messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}])
        used["requests"] += 1
        used["prompt_tokens"] += answer.usage.prompt_tokens
        used["completion_tokens"] += answer.usage.completion_tokens
    return used


async def reloaded_until(pilot, condition, what: str):
    """Refresh the view (ctrl+r) until `condition()`: metering reaches the database in batches."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        await pilot.press("ctrl+r")
        await pilot.pause(0.4)
        value = condition()
        if value:
            return value
    raise AssertionError(f"timed out waiting for {what}; notifications: {notes(pilot)}")


def row_of(pilot, text: str) -> dict | None:
    """The API row whose cells include `text`."""
    table = pilot.app.screen.table
    return next((row for key, row in table.rows_by_key.items()
                 if any(text == str(cell) for cell in table.get_row(key))), None)


def chart_lines(pilot) -> list[str]:
    chart = pilot.app.screen.query_one(BarChart)
    console = Console(width=chart.content_size.width, record=True)
    console.print(chart.render())
    return console.export_text().splitlines()


async def test_keys_real_counts_grouping_period_and_chart(console, stack, unique):
    busy, quiet = unique("usage-busy"), unique("usage-quiet")
    busy_used = ask(stack, make_key(stack, busy)["key"], MODEL, 2)
    quiet_used = ask(stack, make_key(stack, quiet)["key"], "remote-ok", 1)

    async with console("usage 1h") as pilot:
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, UsageView) and pilot.app.screen, "the view")
        for name, model, used in ((busy, MODEL, busy_used), (quiet, "remote-ok", quiet_used)):
            row = await reloaded_until(pilot, lambda: (r := row_of(pilot, name)) and r["requests"] == used["requests"]
                                       and r, f"{name}'s usage")
            assert row["model"] == model
            assert row["prompt_tokens"] == used["prompt_tokens"]
            assert row["completion_tokens"] == used["completion_tokens"]
            shown = next(c for c in cells(pilot) if c[0] == name)
            assert shown[1:5] == [model, str(used["requests"]), "0", str(used["prompt_tokens"])]
        assert screen.answer["by"] == ["key", "model"] and "last 1h · by key+model · cost in USD" in screen.heading()

        # The local filter keeps this test's rows: the totals and the chart are of those.
        await pilot.press("slash")
        screen.prompt().query_one("#prompt-input").value = unique("usage").removeprefix("usage")
        await pilot.press("enter")
        await until(pilot, lambda: sorted(column(pilot, "key")) == sorted([busy, quiet]), "this test's rows alone")
        requests = busy_used["requests"] + quiet_used["requests"]
        totals = str(screen.query_one("#usage-totals").content)
        assert totals.startswith(f"shown: requests {requests}, errors 0, tokens ")
        await pilot.press("t")  # chart tokens
        busy_tokens = busy_used["prompt_tokens"] + busy_used["completion_tokens"]
        quiet_tokens = quiet_used["prompt_tokens"] + quiet_used["completion_tokens"]
        top, other = (busy, quiet) if busy_tokens >= quiet_tokens else (quiet, busy)
        lines = await until(pilot, lambda: (ls := chart_lines(pilot)) and "by tokens" in ls[0] and ls, "the chart")
        assert [line.split(" · ")[0] for line in lines[1:]] == [top, other]
        bars = [line.count("█") for line in lines[1:]]
        assert bars[0] > 0 and bars[0] >= bars[1]
        assert lines[1].endswith(f"{max(busy_tokens, quiet_tokens)} tok")

        # enter shows a row in full.
        await pilot.press("escape")  # the filter goes; the view stays
        await until(pilot, lambda: len(column(pilot, "key")) >= 2 and not screen.table.filter, "the filter cleared")
        screen.table.move_cursor(row=screen.table.get_row_index(next(k for k, r in screen.table.rows_by_key.items()
                                                                         if r["key_name"] == busy)))
        await pilot.press("enter")
        detail = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen, "detail")
        assert f"key_name: {busy}" in detail.body.code
        assert f"prompt_tokens: {busy_used['prompt_tokens']}" in detail.body.code
        await pilot.press("escape")
        await until(pilot, lambda: pilot.app.screen is screen, "the detail closed")

        # b cycles the grouping: by model, the API answers per model, both models listed.
        for _ in range(len(GROUPINGS)):
            if screen.by == ("model",):
                break
            await pilot.press("b")
        await until(pilot, lambda: screen.answer["by"] == ["model"]
                    and {MODEL, "remote-ok"} <= set(column(pilot, "model")), "rows by model")
        assert "by model" in screen.heading()
        assert [c.key for c in screen.table.spec][:2] == ["model", "requests"]
        model_row = row_of(pilot, MODEL)
        assert model_row["requests"] >= busy_used["requests"]

        # Digits pick the period: 15m asks since a quarter of an hour ago, 6 asks for all.
        await pilot.press("1")
        await until(pilot, lambda: screen.answer["since"] and abs(screen.answer["since"] - (time.time() - 900)) < 60,
                    "since 15m")
        await pilot.press("6")
        await until(pilot, lambda: screen.answer["since"] is None and "all time" in screen.heading(), "all time")
        await pilot.press("p")  # cycles back to the start
        await until(pilot, lambda: screen.period == "15m" and screen.answer["since"], "p cycles")

        # u buckets the rows per hour, then day, then month (UTC), newest first; then not at all.
        await pilot.press("u")
        await until(pilot, lambda: screen.answer["bucket"] == "hour" and row_of(pilot, MODEL), "rows per hour")
        assert [c.key for c in screen.table.spec][:2] == ["bucket", "model"] and "per hour (UTC)" in screen.heading()
        rows = list(screen.table.rows_by_key.values())
        assert all(r["bucket"].endswith(":00:00Z") for r in rows)
        assert [r["bucket"] for r in rows] == sorted((r["bucket"] for r in rows), reverse=True)
        shown = next(c for c in cells(pilot) if c[1] == MODEL)
        assert shown[0] == row_of(pilot, MODEL)["bucket"][:16].replace("T", " ")  # 2026-12-03 15:00
        await pilot.press("u", "u")
        await until(pilot, lambda: screen.answer["bucket"] == "month" and row_of(pilot, MODEL), "rows per month")
        assert next(c for c in cells(pilot) if c[1] == MODEL)[0] == time.strftime("%Y-%m", time.gmtime())
        await pilot.press("u")
        await until(pilot, lambda: screen.answer["bucket"] is None and [c.key for c in screen.table.spec][0] == "model",
                    "no buckets")


async def test_a_developer_sees_its_own_usage_only(console, stack, unique):
    name = unique("usage-own")
    key = make_key(stack, name)["key"]
    used = ask(stack, key, "remote-ok", 1)
    ask(stack, make_key(stack, unique("usage-other"))["key"], "remote-ok", 1)  # usage this key must not see
    async with console("usage all key", key=key) as pilot:
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, UsageView) and pilot.app.screen, "the view")
        await reloaded_until(pilot, lambda: (r := row_of(pilot, name)) and r["requests"] == used["requests"], "its row")
        assert column(pilot, "key") == [name]
        assert screen.answer["own_only"] and "your own usage only" in screen.heading()


async def test_a_bad_period_is_the_apis_refusal(console):
    async with console("usage 0m") as pilot:
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "invalid time '0m'" in n), None),
                              "the API's error")
        assert "parameter since" in message
        await pilot.press("1")  # a good period again: the view loads
        await until(pilot, lambda: pilot.app.screen.answer["currency"] == "USD", "usage loaded")
