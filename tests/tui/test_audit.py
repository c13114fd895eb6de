"""The audit view against the real gateway: a key created through the API appears with its
action and target, the server-side filter narrows to it and esc returns to all, enter shows
it in full, the live tail picks up new entries, verify says the chain is intact, and on a
stack of this module's own a row edited in its state.db is named by verify as an error.
Refusals (a bad limit, a viewer without audit.read) are the API's messages."""

from __future__ import annotations

import sqlite3

import pytest

from tests.conftest import UPSTREAM_KEY_ENV, start_stack
from tests.tui.conftest import cells, column, fill, make_key, notes, until
from tui.modals import DetailScreen, FormScreen
from tui.views.audit import AuditView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory, upstream):
    """A stack whose state.db this module may edit: a remote model only, so it starts in seconds."""
    tmp = tmp_path_factory.mktemp("tui-audit")
    profile = tmp / "profile.yaml"
    profile.write_text(f"name: tui-audit\nmodels:\n  - name: remote-ok\n    engine: remote\n"
                       f"    base_url: {upstream.url('ok')}\n    api_key_env: {UPSTREAM_KEY_ENV}\n")
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key})
    yield running
    if running.proc.poll() is None:
        running.stop()


async def test_an_action_appears_and_the_server_filter_narrows_to_it(console, stack, unique):
    name = unique("audit-key")
    target = f"key/{make_key(stack, name)['id']}"
    async with console("audit") as pilot:
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, AuditView) and pilot.app.screen, "the view")
        await until(pilot, lambda: target in column(pilot, "target"), "the key.create entry")
        row = next(r for r in cells(pilot) if target in r)
        assert row[4:6] == ["key.create", target] and row[-1] == "ok"
        assert row[2] == "admin (first start)" and row[3] == "admin"
        everything = screen.table.row_count

        await pilot.press("f")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the filter form")
        await fill(pilot, {"action": "key.create", "target": target, "limit": "5"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(pilot.app.screen, FormScreen) and column(pilot, "target") == [target],
                    "the filtered log")
        assert screen.filters == {"action": "key.create", "target": target, "limit": 5}
        assert "newest 5 · action key.create · target " + target in screen.heading()

        await pilot.press("enter")
        detail = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen, "detail")
        assert f"name: {name}" in detail.body.code and "hash: " in detail.body.code
        assert "prev_hash: " in detail.body.code and "request_id: req_" in detail.body.code
        await pilot.press("escape")
        await until(pilot, lambda: pilot.app.screen is screen, "the detail closed")

        await pilot.press("escape")  # the server filter goes: every action again
        await until(pilot, lambda: screen.table.row_count >= min(everything, 100) and not screen.filters, "all entries")
        assert isinstance(pilot.app.screen, type(screen)) and "newest 100" in screen.heading()

        # `:audit action=A TEXT`: the server filter, and TEXT the table's filter.
        pilot.app.run_command(f"audit action=key.create limit=500 {target}")
        await until(pilot, lambda: pilot.app.screen is not screen and pilot.app.screen.is_mounted, "the new view")
        await until(pilot, lambda: column(pilot, "target") == [target], "the entry alone")
        assert pilot.app.screen.filters == {"action": "key.create", "limit": "500"}
        assert pilot.app.screen.table.filter == target


async def test_live_tail_and_verify(console, stack, unique):
    async with console("audit") as pilot:
        await until(pilot, lambda: cells(pilot), "the log")
        await pilot.press("r")
        await until(pilot, lambda: "live every 2 s" in pilot.app.screen.heading(), "live tail on")
        target = f"key/{make_key(stack, unique('audit-tail'))['id']}"
        await until(pilot, lambda: target in column(pilot, "target"), "the new entry without ctrl+r")
        await pilot.press("r")
        assert "live" not in pilot.app.screen.heading()

        await pilot.press("v")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if n.startswith("Chain intact")), None),
                              "the verification")
        assert " checked, ids 1 to " in message


async def test_refusals_are_the_apis_messages(console, stack, unique):
    async with console("audit") as pilot:
        await until(pilot, lambda: cells(pilot), "the log")
        await pilot.press("f")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the filter form")
        await fill(pilot, {"limit": "0"})
        await pilot.press("ctrl+s")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "limit must be between" in n), None),
                              "the API's error")
        assert "HTTP 400, parameter limit" in message
        assert isinstance(pilot.app.screen, FormScreen)  # kept open with what was typed
        await fill(pilot, {"limit": "many"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("limit must be a whole number" in n for n in notes(pilot)), "the form's check")

    viewer = make_key(stack, unique("audit-viewer"), role="viewer")["key"]
    async with console("audit", key=viewer) as pilot:
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "audit.read" in n), None), "the refusal")
        assert "HTTP 403" in message and "'viewer'" in message
        assert not cells(pilot)
        await pilot.press("v")
        await until(pilot, lambda: sum("audit.read" in n for n in notes(pilot)) == 2, "verify refused too")


async def test_verify_names_an_edited_row(console, own_stack):
    make_key(own_stack, "tui-audit-a")
    async with console("audit", url=own_stack.root, key=own_stack.admin_key) as pilot:
        await until(pilot, lambda: len(cells(pilot)) >= 2, "the log")
        with sqlite3.connect(own_stack.home / "state.db") as conn:
            conn.execute("UPDATE audit_log SET outcome = 'refused: nothing happened' WHERE id = 2")
        await pilot.press("v")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if n.startswith("Row 2:")), None),
                              "the broken chain")
        assert "(edited)" in message and "1 row before it intact" in message
        note = next(n for n in pilot.app._notifications if n.message == message)
        assert note.severity == "error"
