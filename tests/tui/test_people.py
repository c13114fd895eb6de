"""The users and teams views against the real gateway: a user created with a password that
signs in, edited, disabled, given a new password and deleted after a confirmation; a team
created with limits, edited, its members added and removed, deleted (again with force while
it has keys); and the API's refusals as notifications."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.tui.conftest import cells, column, fill, make_key, notes, select_row, until
from tui.modals import ConfirmScreen, DetailScreen, FormScreen
from tui.views.keys import spend_text
from tui.views.people import MembersView, TeamsView, UsersView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]

PASSWORD = "correct horse battery"


def api(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def login(stack, name: str, password: str) -> httpx.Response:
    return httpx.post(f"{stack.root}/auth/login", json={"username": name, "password": password}, timeout=30)


def me_status(stack, key: str, status: int) -> int:
    """GET /auth/me with `key` until it answers `status` (the gateway follows changes within a second)."""
    deadline = time.monotonic() + 5
    while (answer := httpx.get(f"{stack.root}/auth/me", headers={"Authorization": f"Bearer {key}"})).status_code \
            != status and time.monotonic() < deadline:
        time.sleep(0.1)
    return answer.status_code


async def loaded(pilot, view: type) -> None:
    """Wait until `view` shows its first answer (its heading counts the rows)."""
    await until(pilot, lambda: isinstance(pilot.app.screen, view)
                and "[" in str(pilot.app.screen.query_one("#heading").content), f"the {view.TITLE}")


def row_of(pilot, name: str) -> list[str]:
    return next((row for row in cells(pilot) if row[0] == name), [])


async def open_form(pilot, key: str) -> FormScreen:
    await pilot.press(key)
    return await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen) and pilot.app.screen, "the form")


async def confirm(pilot, answer: str) -> None:
    await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
    await pilot.press(answer)


async def test_a_new_users_password_signs_in(console, stack, unique):
    name = unique("console-kim")
    async with console("users") as pilot:
        await loaded(pilot, UsersView)
        await open_form(pilot, "n")
        await fill(pilot, {"name": name, "role": "developer", "email": "kim@example.com",
                           "password": PASSWORD, "again": PASSWORD + "!"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("passwords differ" in n for n in notes(pilot)), "the mismatch")
        assert isinstance(pilot.app.screen, FormScreen)
        await fill(pilot, {"again": PASSWORD})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: row_of(pilot, name), "the new user listed")
        assert row_of(pilot, name)[2:6] == ["developer", "kim@example.com", "active", "yes"]
        await until(pilot, lambda: any(f"User {name} created" in n for n in notes(pilot)), "the notification")

    signed_in = login(stack, name, PASSWORD)
    assert signed_in.status_code == 200, signed_in.text
    assert signed_in.json()["user"] == name and signed_in.json()["role"] == "developer"


async def test_edit_set_password_disable_and_delete_a_user(console, stack, unique):
    name, team = unique("console-lee"), unique("console-lees-team")
    http = api(stack)
    http.post("/admin/users", json={"name": name, "role": "developer", "password": PASSWORD}).raise_for_status()
    http.post("/admin/teams", json={"name": team}).raise_for_status()
    http.post(f"/admin/teams/{team}/members", json={"user": name}).raise_for_status()
    key = make_key(stack, unique("lees-key"), user=name)["key"]

    async with console("users") as pilot:
        await select_row(pilot, name)
        assert row_of(pilot, name)[6] == team  # TEAMS
        await pilot.press("enter")
        detail = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen,
                             "the detail")
        assert team in detail.body.code
        await pilot.press("escape")

        await open_form(pilot, "p")
        await fill(pilot, {"password": "new password 2", "again": "new password 3"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("passwords differ" in n for n in notes(pilot)), "the mismatch")
        await fill(pilot, {"again": "new password 2"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any(f"Password of {name} set" in n for n in notes(pilot)), "the password set")
        assert login(stack, name, "new password 2").status_code == 200
        assert login(stack, name, PASSWORD).status_code == 401

        await select_row(pilot, name)
        form = await open_form(pilot, "e")
        assert form.query_one("#field-role").value == "developer"
        await fill(pilot, {"role": "viewer", "state": "disabled", "email": "lee@example.com"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: row_of(pilot, name)[2:5] == ["viewer", "lee@example.com", "disabled"],
                    "the user disabled")
        user = http.get(f"/admin/users/{name}").json()
        assert (user["role"], user["state"], user["email"]) == ("viewer", "disabled", "lee@example.com")
        assert me_status(stack, key, 401) == 401  # a disabled user's keys are refused

        await pilot.press("ctrl+d")
        await confirm(pilot, "n")
        await pilot.pause(0.3)
        assert name in column(pilot, "name")
        await pilot.press("ctrl+d")
        await confirm(pilot, "y")
        await until(pilot, lambda: name not in column(pilot, "name"), "the user gone from the list")
        await until(pilot, lambda: any(f"User {name} deleted; keys and sessions revoked" in n for n in notes(pilot)),
                    "the notification")

    assert http.get(f"/admin/users/{name}").status_code == 404
    assert http.get(f"/admin/teams/{team}").json()["members"] == []


async def test_user_refusals_are_notifications(console, stack, unique):
    name = unique("console-taken")
    api(stack).post("/admin/users", json={"name": name, "role": "viewer"}).raise_for_status()
    async with console("users") as pilot:
        await select_row(pilot, name)
        await open_form(pilot, "n")
        await fill(pilot, {"name": name, "role": "developer"})
        await pilot.press("ctrl+s")
        message = await until(pilot, lambda: next((n for n in notes(pilot) if "already exists" in n), None),
                              "the API's conflict")
        assert "HTTP 409" in message
        await fill(pilot, {"name": unique("console-short"), "password": "short", "again": "short"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("a password needs 8" in n for n in notes(pilot)), "the API's 400")
        assert isinstance(pilot.app.screen, FormScreen)
        assert pilot.app.screen.query_one("#field-password").value == "short"
        await pilot.press("escape")

        await open_form(pilot, "e")
        await fill(pilot, {"name": "usr_bad"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("does not start with 'usr_'" in n for n in notes(pilot)), "the bad name")
    assert api(stack).get(f"/admin/users/{unique('console-short')}").status_code == 404


async def test_create_edit_and_delete_a_team(console, stack, unique):
    name = unique("console-team")
    http = api(stack)
    async with console("teams") as pilot:
        await loaded(pilot, TeamsView)
        await open_form(pilot, "n")
        await fill(pilot, {"name": name, "rpm": "9", "budget_tokens": "1000", "period": "day"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: row_of(pilot, name), "the new team listed")
        assert http.get(f"/admin/teams/{name}").json()["limits"] == {"rpm": 9, "budget_tokens": 1000, "period": "day"}

        await select_row(pilot, name)
        form = await open_form(pilot, "e")
        assert form.query_one("#field-rpm").value == "9"
        await fill(pilot, {"rpm": "", "tpm": "500"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: "tpm=500" in " ".join(row_of(pilot, name)), "the new limits")
        team = http.get("/admin/teams").json()
        assert next(t for t in team if t["name"] == name)["limits"] == {"tpm": 500, "budget_tokens": 1000,
                                                                       "period": "day"}
        assert row_of(pilot, name)[6] == spend_text(next(t for t in team if t["name"] == name))

        await pilot.press("y")
        detail = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen,
                             "the detail")
        assert "tpm: 500" in detail.body.code
        await pilot.press("escape")

        await pilot.press("ctrl+d")
        await confirm(pilot, "y")
        await until(pilot, lambda: name not in column(pilot, "name"), "the team gone")
    assert http.get(f"/admin/teams/{name}").status_code == 404


async def test_members_are_added_and_removed(console, stack, unique):
    team, ann, bob = unique("console-crew"), unique("console-ann"), unique("console-bob")
    http = api(stack)
    http.post("/admin/teams", json={"name": team}).raise_for_status()
    for user in (ann, bob):
        http.post("/admin/users", json={"name": user, "role": "developer"}).raise_for_status()
    http.post(f"/admin/teams/{team}/members", json={"user": bob}).raise_for_status()
    http.post("/admin/keys", json={"name": unique("bobs-key"), "user": bob, "team": team}).raise_for_status()

    def members() -> list[str]:
        return [m["name"] for m in http.get(f"/admin/teams/{team}").json()["members"]]

    async with console("teams") as pilot:
        await select_row(pilot, team)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, MembersView) and cells(pilot), "the members")
        assert row_of(pilot, bob)[3] == unique("bobs-key")  # the key billed to the team

        await open_form(pilot, "a")
        await fill(pilot, {"user": ann})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: ann in column(pilot, "name"), "the new member")
        assert sorted(members()) == sorted([ann, bob])

        await select_row(pilot, ann)
        await pilot.press("ctrl+d")
        await confirm(pilot, "y")
        await until(pilot, lambda: ann not in column(pilot, "name"), "the member removed")
        assert members() == [bob]

        await select_row(pilot, bob)  # has a key billed to the team: the API refuses
        await pilot.press("ctrl+d")
        await confirm(pilot, "y")
        await until(pilot, lambda: any("HTTP 409" in n for n in notes(pilot)), "the API's refusal")
        assert members() == [bob]

        await pilot.press("escape")
        await until(pilot, lambda: isinstance(pilot.app.screen, TeamsView), "back to the teams")


async def test_deleting_a_team_with_keys_asks_again_and_revokes_them(console, stack, unique):
    team = unique("console-busy")
    http = api(stack)
    http.post("/admin/teams", json={"name": team}).raise_for_status()
    key = make_key(stack, unique("busy-key"), team=team)["key"]
    async with console("teams") as pilot:
        await select_row(pilot, team)
        await open_form(pilot, "n")  # a name taken: the API's 409 in the form
        await fill(pilot, {"name": team})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("already exists" in n for n in notes(pilot)), "the API's conflict")
        await pilot.press("escape")

        await pilot.press("ctrl+d")
        await confirm(pilot, "y")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen) and "active keys" in
                    pilot.app.screen.question, "the second question")
        await pilot.press("n")
        await pilot.pause(0.3)
        assert http.get(f"/admin/teams/{team}").status_code == 200
        assert me_status(stack, key, 200) == 200

        await pilot.press("ctrl+d")
        await confirm(pilot, "y")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen) and "active keys" in
                    pilot.app.screen.question, "the second question")
        await pilot.press("y")
        await until(pilot, lambda: team not in column(pilot, "name"), "the team gone")
        await until(pilot, lambda: any(f"Team {team} deleted; keys revoked: 1." in n for n in notes(pilot)),
                    "the notification")
    assert http.get(f"/admin/teams/{team}").status_code == 404
    assert me_status(stack, key, 401) == 401
