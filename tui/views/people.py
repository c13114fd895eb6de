"""Users and teams: create, edit, set a password, delete; a team's members (add, remove),
limits, and budget with what it has spent this period."""

from __future__ import annotations

import asyncio

from textual import work
from textual.binding import Binding

from appliance.admin_client import AdminApiError
from appliance.users import ROLES
from tui import format as fmt
from tui.modals import DetailScreen, Field, FormScreen, as_yaml
from tui.view import TableView
from tui.views.keys import limits_text, spend_text
from tui.views.policies import policy_text
from tui.views.settings import limit_fields, settings_body
from tui.widgets import Column

STATES = ("active", "disabled")


async def team_details(api, teams: list[dict]) -> dict[str, dict]:
    """Each team's GET /admin/teams/{id} (members and active keys), by team id; a team deleted
    meanwhile is left out."""
    answers = await asyncio.gather(*(api.get(f"/admin/teams/{t['id']}") for t in teams), return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException) and not (isinstance(answer, AdminApiError) and answer.status == 404):
            raise answer
    return {a["id"]: a for a in answers if isinstance(a, dict)}


def password_fields(label: str) -> list[Field]:
    return [Field("password", label, password=True), Field("again", "The same password again", password=True)]


def checked_password(values: dict[str, str]) -> str:
    """The password typed, once both fields agree."""
    if values["password"] != values["again"]:
        raise ValueError("the two passwords differ: type the same one twice")
    return values["password"]


async def show_user(view: TableView, user_id: str) -> None:
    """A user in full, as the API has it now."""
    user = await view.attempt(view.api.get(f"/admin/users/{user_id}"))
    if user is not None:
        await view.app.push_screen(DetailScreen(f"user {user['name']} ({user['id']})", as_yaml(user)))


class UsersView(TableView):
    TITLE = "users"
    COLUMNS = (
        Column("name", "NAME"), Column("id", "ID"), Column("role", "ROLE"), Column("email", "EMAIL"),
        Column("state", "STATE"), Column("has_password", "PASSWORD", lambda r: "yes" if r["has_password"] else "no"),
        Column("teams", "TEAMS"), Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
    )
    BINDINGS = [
        Binding("n", "create", "New"),
        Binding("e", "edit", "Edit"),
        Binding("p", "password", "Password"),
    ]

    async def fetch(self) -> list[dict]:
        users, teams = await asyncio.gather(self.api.get("/admin/users"), self.api.get("/admin/teams"))
        member_of: dict[str, list[str]] = {}
        for team in (await team_details(self.api, teams)).values():
            for member in team["members"]:
                member_of.setdefault(member["id"], []).append(team["name"])
        return [u | {"teams": member_of.get(u["id"], [])} for u in users]

    async def open(self, row: dict) -> None:
        await show_user(self, row["id"])

    def delete_question(self, row: dict) -> str | None:
        return f"Delete user {row['name']!r}? Their keys and sessions are revoked and they leave their teams."

    async def delete(self, row: dict) -> None:
        deleted = await self.attempt(self.api.delete(f"/admin/users/{row['id']}"))
        if deleted is not None:
            revoked = len(deleted["revoked_keys"])
            also = f"; keys and sessions revoked: {revoked}" if revoked else ""
            self.notify(f"User {row['name']} deleted{also}.")

    @work(group="action")
    async def action_create(self) -> None:
        async def create(values: dict[str, str]) -> dict:
            body = {k: values[k] for k in ("name", "role", "email") if values[k]}
            if values["password"] or values["again"]:
                body["password"] = checked_password(values)
            return await self.api.post("/admin/users", body)

        fields = [Field("name", "Name (letters, digits, . _ @ -)"),
                  Field("role", "Role (at most yours)", "developer", choices=ROLES),
                  Field("email", "Email (optional)"),
                  *password_fields("Password for signing in (8 characters or more; empty: keys only)")]
        await self.form("New user", fields, create, done=lambda user: f"User {user['name']} created"
                        + ("." if user["has_password"] else ", without a password."))

    @work(group="action")
    async def action_edit(self) -> None:
        row = self.selected
        if row is None:
            return

        async def update(values: dict[str, str]) -> dict:
            if not values["name"] or not values["role"]:
                raise ValueError("a user needs a name and a role")
            body = {name: values[name] or None for name in ("name", "role", "email")
                    if values[name] != (row[name] or "")}
            if values["state"] and values["state"] != row["state"]:
                body["disabled"] = values["state"] == "disabled"
            return await self.api.patch(f"/admin/users/{row['id']}", body) if body else row

        fields = [Field("name", "Name", row["name"]), Field("role", "Role (at most yours)", row["role"], choices=ROLES),
                  Field("email", "Email (empty: none)", row["email"] or ""),
                  Field("state", "State (disabled: their keys and sessions are refused at once)", row["state"],
                        choices=STATES)]
        await self.form(f"User {row['name']}", fields, update,
                        done=lambda user: f"User {user['name']} updated.")

    @work(group="action")
    async def action_password(self) -> None:
        row = self.selected
        if row is None:
            return

        async def set_password(values: dict[str, str]) -> dict:
            return await self.api.post(f"/admin/users/{row['id']}/password", {"password": checked_password(values)})

        fields = password_fields("New password (8 characters or more; their sessions end, their keys stay)")
        if await self.app.push_screen_wait(FormScreen(f"Password of {row['name']}", fields, set_password)):
            self.notify(f"Password of {row['name']} set; their sessions are signed out.")
            self.reload()


class TeamsView(TableView):
    TITLE = "teams"
    COLUMNS = (
        Column("name", "NAME"), Column("id", "ID"), Column("members", "MEMBERS"), Column("keys", "KEYS"),
        Column("limits", "LIMITS", limits_text), Column("policy", "POLICY", lambda r: policy_text(r["policy"])),
        Column("spend", "SPENT", spend_text), Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
    )
    BINDINGS = [
        Binding("enter", "open", "Members"),
        Binding("y", "detail", "Detail"),
        Binding("n", "create", "New"),
        Binding("e", "edit", "Limits"),
    ]

    async def fetch(self) -> list[dict]:
        teams = await self.api.get("/admin/teams")
        details = await team_details(self.api, teams)
        return [t | {"members": len(details[t["id"]]["members"]), "keys": len(details[t["id"]]["keys"])}
                for t in teams if t["id"] in details]

    async def open(self, row: dict) -> None:
        await self.app.push_screen(MembersView(row))

    @work(group="action")
    async def action_detail(self) -> None:
        row = self.selected
        team = None if row is None else await self.attempt(self.api.get(f"/admin/teams/{row['id']}"))
        if team is not None:
            await self.app.push_screen(DetailScreen(f"team {team['name']} ({team['id']})", as_yaml(team)))

    def delete_question(self, row: dict) -> str | None:
        return f"Delete team {row['name']!r}? Its {row['members']} members leave it."

    async def delete(self, row: dict) -> None:
        path = f"/admin/teams/{row['id']}"
        try:
            deleted = await self.api.delete(path)
        except AdminApiError as exc:
            if exc.status != 409:
                self.notify(str(exc), title="Refused", severity="error", timeout=10)
                return
            question = f"{exc}\nRevoke the team's active keys and delete it anyway?"
            if not await self.confirm(question):
                return
            deleted = await self.attempt(self.api.delete(path, force="true"))
            if deleted is None:
                return
        revoked = len(deleted["revoked_keys"])
        also = f"; keys revoked: {revoked}" if revoked else ""
        self.notify(f"Team {row['name']} deleted{also}.")

    @work(group="action")
    async def action_create(self) -> None:
        async def create(values: dict[str, str]) -> dict:
            return await self.api.post("/admin/teams", {"name": values["name"]} | settings_body(values))

        fields = [Field("name", "Name (letters, digits, . _ @ -)"), *limit_fields()]
        await self.form("New team", fields, create,
                        done=lambda team: f"Team {team['name']} created.")

    @work(group="action")
    async def action_edit(self) -> None:
        row = self.selected
        if row is None:
            return

        async def update(values: dict[str, str]) -> dict:
            body = settings_body(values, row)
            if values["name"] != row["name"]:
                body["name"] = values["name"]
            return await self.api.patch(f"/admin/teams/{row['id']}", body) if body else row

        fields = [Field("name", "Name", row["name"]), *limit_fields(row)]
        await self.form(f"Limits of team {row['name']}", fields, update,
                        done=lambda team: f"Team {team['name']} updated.")


class MembersView(TableView):
    """A team's members, pushed from the teams view: `a` adds one, ctrl-d removes one."""

    TITLE = "members"
    COLUMNS = (
        Column("name", "NAME"), Column("id", "ID"), Column("role", "ROLE"),
        Column("keys", "KEYS BILLED TO THE TEAM"),
    )
    BINDINGS = [Binding("a", "add", "Add member"), Binding("ctrl+d", "delete", "Remove member")]

    def __init__(self, team: dict) -> None:
        super().__init__()
        self.team = team

    def heading(self) -> str:
        return f"members of team {self.team['name']}"

    async def fetch(self) -> list[dict]:
        team = await self.api.get(f"/admin/teams/{self.team['id']}")
        keys: dict[str, list[str]] = {}
        for key in team["keys"]:
            keys.setdefault(key["user_id"], []).append(key["name"])
        return [m | {"keys": keys.get(m["id"], [])} for m in team["members"]]

    async def open(self, row: dict) -> None:
        await show_user(self, row["id"])

    def delete_question(self, row: dict) -> str | None:
        return f"Remove {row['name']!r} from team {self.team['name']!r}?"

    async def delete(self, row: dict) -> None:
        await self.attempt(self.api.delete(f"/admin/teams/{self.team['id']}/members/{row['id']}"),
                           done=f"{row['name']} left team {self.team['name']}.")

    @work(group="action")
    async def action_add(self) -> None:
        users = await self.attempt(self.api.get("/admin/users"))
        if users is None:
            return
        members = {row["id"] for row in self.table.all_rows}
        candidates = [u["name"] for u in users if u["id"] not in members]
        if not candidates:
            self.notify("Every user is a member already: :users creates one.", severity="warning")
            return

        async def add(values: dict[str, str]) -> dict:
            if not values["user"]:
                raise ValueError("choose a user")
            return await self.api.post(f"/admin/teams/{self.team['id']}/members", {"user": values["user"]})

        form = FormScreen(f"Add a member to team {self.team['name']}", [Field("user", "User", choices=candidates)], add)
        added = await self.app.push_screen_wait(form)
        if added is not None:
            self.notify(f"{added['user']['name']} joined team {self.team['name']}.")
            self.reload()
