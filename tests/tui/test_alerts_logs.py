"""The alerts and request-log views against the real gateway: the built-in rules in force;
a request of a team that logs opened by its id straight from `:logs ID` (masked), found with
f, and an unknown id refused with the API's message."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.tui.conftest import cells, fill, notes, until
from tui.modals import DetailScreen, FormScreen
from tui.views.alerts import AlertsView
from tui.views.request_logs import RequestLogsView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]

RRN = "900101-1234568"


def logged_request(stack, unique) -> str:
    admin = httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=60)
    team = unique("tui-logged")
    admin.post("/admin/teams", json={"name": team, "log_requests": True}).raise_for_status()
    key = admin.post("/admin/keys", json={"name": unique("tui-logged-key"), "team": team}).json()["key"]
    answer = httpx.post(f"{stack.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        json={"model": "remote-ok", "messages": [{"role": "user", "content": f"I am {RRN}"}]})
    answer.raise_for_status()
    request_id = answer.headers["x-request-id"]
    deadline = time.monotonic() + 15
    while admin.get(f"/admin/request-logs/{request_id}").status_code != 200:  # written within a second or so
        assert time.monotonic() < deadline, "the request was not logged"
        time.sleep(0.2)
    return request_id


async def test_the_alerts_view_and_the_rules_in_force(console):
    async with console("alerts") as pilot:
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, AlertsView) and pilot.app.screen, "the view")
        await until(pilot, lambda: "[" in str(screen.query_one("#heading").content), "the first load")
        await pilot.press("r")
        rules = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen, "rules")
        for rule in ("error-rate:", "engine-crash-loop:", "gpu-memory:", "budget:"):
            assert rule in rules.body.code
        assert "origin: default" in rules.body.code and "threshold: 0.05 share of answers" in rules.body.code


async def test_a_logged_request_opens_by_its_id_masked(console, stack, unique):
    request_id = logged_request(stack, unique)
    async with console(f"logs {request_id}") as pilot:
        detail = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen,
                             "the request opened", timeout=20)
        assert f"request_id: {request_id}" in detail.body.code and "pong" in detail.body.code
        assert RRN not in detail.body.code and "[KR_RRN]" in detail.body.code
        await pilot.press("escape")
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, RequestLogsView) and pilot.app.screen, "list")
        await until(pilot, lambda: any(request_id in row for row in cells(pilot)), "the request in the list")

        await pilot.press("f")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the find form")
        await fill(pilot, {"request_id": "req_nothing"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("No request 'req_nothing'" in n for n in notes(pilot)), "the 404")
        await fill(pilot, {"request_id": request_id})
        await pilot.press("ctrl+s")
        found = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen, "found")
        assert f"request_id: {request_id}" in found.body.code
        assert screen.is_attached
