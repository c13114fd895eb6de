"""The routes view against the real gateway: create a canary route that the gateway then
serves, read its models' states, edit it, shift its weights, delete it after a
confirmation; and the API's and the form's refusals as notifications."""

from __future__ import annotations

import io

import httpx
import pytest
from rich.console import Console

from tests.conftest import DEFAULT_MODEL
from tests.tui.conftest import cells, column, fill, notes, select_row, until
from tui.modals import ConfirmScreen, DetailScreen, FormScreen

pytestmark = [pytest.mark.stack, pytest.mark.anyio]


def route(stack, name: str) -> dict | None:
    answer = httpx.get(f"{stack.root}/admin/routes/{name}", headers={"Authorization": f"Bearer {stack.admin_key}"})
    return None if answer.status_code == 404 else answer.raise_for_status().json()


def row(pilot, name: str) -> list[str]:
    return next((r for r in cells(pilot) if r[0] == name), [])


async def form(pilot, key: str) -> FormScreen:
    await pilot.press(key)
    return await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen) and pilot.app.screen, f"the {key} form")


async def test_create_a_canary_then_edit_shift_and_delete_it(console, stack, unique):
    name = unique("console-canary")
    async with console("routes") as pilot:
        await until(pilot, lambda: "[" in str(pilot.app.screen.query_one("#heading").content), "the routes")
        await form(pilot, "n")
        await fill(pilot, {"name": name, "targets": f"{DEFAULT_MODEL}=90, remote-ok=10", "fallbacks": "remote-broken"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: name in column(pilot, "name"), "the new route listed")
        stored = route(stack, name)
        assert [(t["model"], t["weight"]) for t in stored["targets"]] == [(DEFAULT_MODEL, 90), ("remote-ok", 10)]
        assert stored["fallbacks"] == ["remote-broken"] and stored["shadow"] is None and stored["source"] == "admin"
        assert row(pilot, name)[1] == f"{DEFAULT_MODEL} 90% / remote-ok 10%" and row(pilot, name)[4] == "stored"
        # Served within a second: the gateway reports its models' states.
        await until(pilot, lambda: row(pilot, name)[5].startswith("ready"), "the route served and ready")

        await select_row(pilot, name)
        await pilot.press("enter")
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen, "details")
        recorded = Console(record=True, width=160, file=io.StringIO())
        recorded.print(screen.body)
        lines = [line.split() for line in recorded.export_text().splitlines()]
        assert ["target", DEFAULT_MODEL, "90", "90%", "ready"] in lines
        assert ["fallback", "1", "remote-broken"] in [line[:3] for line in lines]
        await pilot.press("escape")

        screen = await form(pilot, "e")
        assert screen.query_one("#field-targets").value == f"{DEFAULT_MODEL}=90, remote-ok=10"
        await fill(pilot, {"fallbacks": "remote-broken, remote-down", "shadow": "remote-slow=5"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: route(stack, name)["fallbacks"] == ["remote-broken", "remote-down"], "the edit")
        assert route(stack, name)["shadow"] == {"model": "remote-slow", "percent": 5.0}
        await until(pilot, lambda: row(pilot, name)[3] == "remote-slow 5%", "the shadow listed")

        screen = await form(pilot, "w")
        assert [screen.query_one(f"#field-t{i}").value for i in (0, 1)] == ["90", "10"]
        await fill(pilot, {"t0": "50", "t1": "50"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: [t["weight"] for t in route(stack, name)["targets"]] == [50, 50], "the shift")
        assert route(stack, name)["fallbacks"] == ["remote-broken", "remote-down"]  # the rest as it was
        await until(pilot, lambda: row(pilot, name)[1] == f"{DEFAULT_MODEL} 50% / remote-ok 50%", "the new shares")

        await select_row(pilot, name)
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("n")
        await pilot.pause(0.3)
        assert route(stack, name) is not None
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: name not in column(pilot, "name"), "the route gone from the list")
        assert route(stack, name) is None
        assert any(f"Route {name} deleted" in n for n in notes(pilot))


async def test_refusals_keep_the_form_open(console, stack, unique):
    name = unique("console-refused")
    async with console("routes") as pilot:
        await until(pilot, lambda: "[" in str(pilot.app.screen.query_one("#heading").content), "the routes")
        await form(pilot, "n")
        await fill(pilot, {"name": name, "targets": f"{DEFAULT_MODEL}=95, no-such-model=5"})
        await pilot.press("ctrl+s")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "not a served model" in n), None),
                              "the API's refusal")
        assert "HTTP 400, parameter targets[1].model" in message
        assert isinstance(pilot.app.screen, FormScreen)
        assert pilot.app.screen.query_one("#field-targets").value == f"{DEFAULT_MODEL}=95, no-such-model=5"
        await fill(pilot, {"targets": f"{DEFAULT_MODEL}=lots"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("not MODEL=WEIGHT" in n for n in notes(pilot)), "the form's own check")
        await fill(pilot, {"targets": f"{DEFAULT_MODEL}=1, remote-ok=1"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: name in column(pilot, "name"), "the route listed")

        await select_row(pilot, name)
        await form(pilot, "w")
        await fill(pilot, {"t0": "80", "t1": "10"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("add up to 90%" in n for n in notes(pilot)), "the sum refused")
        assert [t["weight"] for t in route(stack, name)["targets"]] == [1, 1]
        await pilot.press("escape")
    httpx.delete(f"{stack.root}/admin/routes/{name}", headers={"Authorization": f"Bearer {stack.admin_key}"})
