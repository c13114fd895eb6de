"""The policies view against the real gateway: a deny list set on a key refuses a real chat
request through the openai client; a team's PII rule applies to the keys billed to it; a
bad detector or pattern is the API's 400 as a notification; ctrl-d clears a policy after a
confirmation."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL
from tests.tui.conftest import cells, fill, make_key, notes, until
from tui.modals import ConfirmScreen, DetailScreen, FormScreen

pytestmark = [pytest.mark.stack, pytest.mark.anyio]


def api(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def refused(stack, key: str, text: str) -> openai.BadRequestError:
    """The gateway's refusal of a chat carrying `text` (it follows a policy change within a second)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            stack.client(key).chat.completions.create(model=DEFAULT_MODEL, max_tokens=4,
                                                      messages=[{"role": "user", "content": text}])
        except openai.BadRequestError as exc:
            return exc
        assert time.monotonic() < deadline, f"a chat with {text!r} was answered"
        time.sleep(0.2)


async def only_row(pilot, name: str, kind: str) -> list[str]:
    """Filter the table down to `kind` `name` (as `/` does) and return its row."""
    await until(pilot, lambda: cells(pilot), "the policies")
    await pilot.press("slash")
    await pilot.press(*name)
    await pilot.press("enter")
    rows = await until(pilot, lambda: [r for r in cells(pilot) if r[0] == kind and r[1] == name], f"{kind} {name}")
    assert len(cells(pilot)) == len([r for r in cells(pilot) if name in " ".join(r)])
    pilot.app.screen.table.move_cursor(row=cells(pilot).index(rows[0]))
    await pilot.pause()
    return rows[0]


async def test_a_deny_list_set_on_a_key_refuses_a_real_chat(console, stack, unique):
    name = unique("console-deny")
    made = make_key(stack, name)
    async with console("policies") as pilot:
        assert (await only_row(pilot, name, "key"))[6] == "-"  # DENY
        await pilot.press("e")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the policy form")
        assert "kr_rrn (rrn)" in str(pilot.app.screen.query_one(".field-label").content)  # the detectors named
        await fill(pilot, {"deny": r"purple elephant | re:zebra\d+", "deny_action": "block", "injection": "flag"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: next((r for r in cells(pilot) if r[1] == name), [None] * 9)[6] == "2 block",
                    "the deny list shown")
        assert api(stack).get(f"/admin/keys/{made['id']}").json()["policy"] == {  # block: the default, left out
            "deny": ["purple elephant", r"re:zebra\d+"], "injection": "flag"}

        await pilot.press("enter")
        detail = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen,
                             "the policy in full")
        shown = detail.body.code
        assert "purple elephant" in shown and "no_external" in shown  # the defaults too
        await pilot.press("escape")

    error = refused(stack, made["key"], "Tell me about the purple elephant.")
    assert error.code == "policy_violation"
    assert refused(stack, made["key"], "what is zebra42?").code == "policy_violation"


async def test_a_team_policy_applies_to_its_keys_and_bad_rules_are_refused(console, stack, unique):
    team = unique("console-pii")
    http = api(stack)
    http.post("/admin/teams", json={"name": team}).raise_for_status()
    key = make_key(stack, unique("pii-key"), team=team)
    async with console("policies") as pilot:
        await only_row(pilot, team, "team")
        await pilot.press("e")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the policy form")
        await fill(pilot, {"pii": "nope=mask"})
        await pilot.press("ctrl+s")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "unknown PII detector" in n), None),
                              "the API's refusal of the detector")
        assert "'nope'" in message and "HTTP 400" in message
        await fill(pilot, {"pii": "email=block", "deny": "re:("})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("not a valid regular expression" in n for n in notes(pilot)),
                    "the API's refusal of the pattern")
        assert isinstance(pilot.app.screen, FormScreen)
        await fill(pilot, {"deny": ""})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: next((r for r in cells(pilot) if r[1] == team), [None] * 9)[4] == "email=block",
                    "the team's PII rule shown")
        assert http.get(f"/admin/teams/{team}").json()["policy"] == {"pii": {"email": "block"}}

        assert refused(stack, key["key"], "Write to kim@example.com please.").code == "policy_violation"

        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: any(f"Policy of team {team} cleared" in n for n in notes(pilot)), "cleared")
    assert http.get(f"/admin/teams/{team}").json()["policy"] == {}
