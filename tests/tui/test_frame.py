"""What every view shares, driven against the real stack: `:` jumps to a view by name or
alias, esc goes back, `?` lists the view's keys, errors arrive as notifications (an
unreachable gateway, a role the API refuses), and `appliance console` runs in a terminal."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import BIN, free_port
from tests.tui.conftest import Terminal, cells, make_key, notes, until
from tui.modals import HelpScreen
from tui.views import COMMANDS
from tui.views.dashboard import Dashboard
from tui.views.keys import KeysView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]


async def test_colon_jumps_to_views_and_esc_goes_back(console):
    async with console() as pilot:
        await until(pilot, lambda: isinstance(pilot.app.screen, Dashboard), "the dashboard")
        await pilot.press("colon", *"k", "enter")  # an alias
        await until(pilot, lambda: isinstance(pilot.app.screen, KeysView), "the keys view")
        await until(pilot, lambda: cells(pilot), "the keys")
        await pilot.press("colon", *"nothing", "enter")
        await until(pilot, lambda: any("no view 'nothing'" in n for n in notes(pilot)), "the unknown view's note")
        assert isinstance(pilot.app.screen, KeysView)
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(pilot.app.screen, Dashboard), "back on the dashboard")
        await pilot.press("escape")  # the dashboard is the bottom: esc stays
        assert isinstance(pilot.app.screen, Dashboard)
        await pilot.press("colon", *"q", "enter")
        await until(pilot, lambda: not pilot.app.is_running, "the console to quit")


async def test_every_view_opens_and_help_lists_its_keys(console):
    async with console() as pilot:
        for command in COMMANDS:
            pilot.app.run_command(command.name)
            await until(pilot, lambda: type(pilot.app.screen).__name__ == command.target.rpartition(":")[2],
                        f":{command.name}")
            await pilot.pause(0.3)
            await pilot.press("question_mark")
            help = await until(pilot, lambda: isinstance(pilot.app.screen, HelpScreen) and pilot.app.screen, "help")
            described = dict(help.keys)
            assert described["esc"] == "Back" and described[":"] == "Views" and described["?"] == "Help"
            await pilot.press("escape")
        errors = [n for n in notes(pilot) if "HTTP" in n or "Traceback" in n]
        assert not errors, errors


async def test_an_unreachable_gateway_is_a_notification(console):
    async with console(url=f"http://127.0.0.1:{free_port()}") as pilot:
        await until(pilot, lambda: pilot.app.status == "unreachable", "the unreachable status")
        await until(pilot, lambda: any("cannot reach the gateway" in n for n in notes(pilot)), "a notification")
        assert pilot.app.is_running


async def test_a_role_the_api_refuses_sees_its_message(console, stack, unique):
    viewer = make_key(stack, unique("viewer"), role="viewer")["key"]
    async with console("keys", key=viewer) as pilot:
        await until(pilot, lambda: "(viewer)" in pilot.app.who, "who the console acts as")
        pilot.app.run_command("audit")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "HTTP 403" in n), None), "the refusal")
        assert "viewer" in message


def test_the_command_runs_in_a_terminal_and_quits(stack, tmp_path):
    """`appliance console` in a real pseudo-terminal: it draws the dashboard of the gateway
    it was pointed at, and ctrl+q ends it with status 0."""
    terminal = Terminal([str(BIN / "appliance"), "console", "--url", stack.root, "--key", stack.admin_key],
                        dict(os.environ), tmp_path)
    try:
        # what only a dashboard drawn from the gateway's answer shows (the shared stack's
        # models come and go, and a narrow column truncates their names)
        terminal.wait_for("replicas healthy:", "backup state.db")
        terminal.type(b"\x11")  # ctrl+q
        assert terminal.exit_code() == 0, "the console did not quit on ctrl+q"
    finally:
        terminal.close()


def test_help_of_the_command_names_its_options():
    out = subprocess.run([str(BIN / "appliance"), "console", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--url", "--key", "--home", "--view", "--refresh"):
        assert option in out
