"""The keys view against the real gateway: create a key (its secret shown once and working),
change its limits, revoke it after a confirmation, and an API refusal as a notification."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.tui.conftest import cells, column, fill, notes, select_row, until
from tui.modals import ConfirmScreen, FormScreen, SecretScreen

pytestmark = [pytest.mark.stack, pytest.mark.anyio]


async def test_create_shows_the_secret_once_and_it_works(console, stack, unique):
    name = unique("console-key")
    async with console("keys") as pilot:
        await until(pilot, lambda: cells(pilot), "the keys")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the form")
        await fill(pilot, {"name": name, "role": "developer", "rpm": "7", "budget_tokens": "5000"})
        await pilot.press("ctrl+s")
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, SecretScreen) and pilot.app.screen,
                             "the secret")
        secret = screen.secret
        assert secret.startswith("sk-ap-")
        await pilot.press("enter")
        await until(pilot, lambda: name in column(pilot, "name"), "the new key listed")
        row = next(r for r in cells(pilot) if r[0] == name)
        assert "rpm=7" in " ".join(row) and "budget_tokens=5000" in " ".join(row)
        assert secret not in " ".join(" ".join(r) for r in cells(pilot))  # never shown again

    # The secret is a real key of the gateway, accepted at once.
    assert stack.client(secret).models.list().data


async def test_edit_limits_then_revoke_with_confirmation(console, stack, unique):
    name = unique("console-revoke")
    made = httpx.post(f"{stack.root}/admin/keys", json={"name": name, "tpm": 100},
                      headers={"Authorization": f"Bearer {stack.admin_key}"}).json()
    async with console("keys") as pilot:
        await select_row(pilot, name)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the limits form")
        assert pilot.app.screen.query_one("#field-tpm").value == "100"
        await fill(pilot, {"tpm": "", "rpm": "3"})  # emptied: no limit; set: 3
        await pilot.press("ctrl+s")
        await until(pilot, lambda: "rpm=3" in " ".join(next((r for r in cells(pilot) if r[0] == name), [])),
                    "the new limits")
        assert "tpm" not in " ".join(next(r for r in cells(pilot) if r[0] == name))

        await select_row(pilot, name)
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("n")  # declined: nothing happens
        await pilot.pause(0.3)
        assert name in column(pilot, "name")
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: name not in column(pilot, "name"), "the key gone from the list")
        assert any("revoked" in n for n in notes(pilot))

    # The gateway applies a revocation within a second.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            stack.client(made["key"]).models.list()
        except openai.AuthenticationError:
            return
        time.sleep(0.1)
    pytest.fail("the revoked key still works")


async def test_an_api_refusal_is_a_notification_and_the_form_stays(console, unique):
    async with console("keys") as pilot:
        await until(pilot, lambda: cells(pilot), "the keys")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the form")
        await fill(pilot, {"name": unique("bad"), "expires_in": "soon"})
        await pilot.press("ctrl+s")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "expires_in" in n), None),
                              "the API's error")
        assert "HTTP 400" in message
        assert isinstance(pilot.app.screen, FormScreen)  # what was typed is still there
        assert pilot.app.screen.query_one("#field-expires_in").value == "soon"
        await fill(pilot, {"rpm": "many"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("not a whole number" in n for n in notes(pilot)), "the form's own check")
