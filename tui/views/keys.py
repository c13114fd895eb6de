"""API keys: create (the secret shown once), change limits, revoke, and each key's budget
with what it has spent this period."""

from __future__ import annotations

import asyncio

from textual import work
from textual.binding import Binding

from appliance.keys import ROLES
from tui import format as fmt
from tui.modals import DetailScreen, Field, FormScreen, SecretScreen, as_yaml
from tui.view import TableView
from tui.views.settings import limit_fields, settings_body
from tui.widgets import Column


def limits_text(row: dict) -> str:
    return fmt.text(row.get("limits"))


def spend_text(row: dict) -> str:
    """'420/1000 tok 42%' against the tighter budget; '-' without one."""
    spend = row.get("spend")
    if not spend:
        return "-"
    parts = []
    if spend.get("budget_tokens"):
        parts.append(f"{spend['tokens']}/{spend['budget_tokens']} tok ({spend['tokens'] / spend['budget_tokens']:.0%})")
    if spend.get("budget_cost"):
        parts.append(f"{spend['cost']:.4g}/{spend['budget_cost']:g} ({spend['cost'] / spend['budget_cost']:.0%})")
    return ", ".join(parts) or "-"


class KeysView(TableView):
    """API keys and sign-in sessions: n creates a key (its secret shown once), e changes its
    limits, ctrl-d revokes it, a shows revoked ones too; SPENT is the budget's use this period."""

    TITLE = "keys"
    COLUMNS = (
        Column("name", "NAME"), Column("id", "ID"), Column("prefix", "PREFIX"), Column("role", "ROLE"),
        Column("user", "USER"), Column("team", "TEAM"), Column("state", "STATE"),
        Column("expires_at", "EXPIRES", lambda r: fmt.when(r.get("expires_at"))),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
        Column("limits", "LIMITS", limits_text), Column("spend", "SPENT", spend_text),
    )
    BINDINGS = [
        Binding("n", "create", "New"),
        Binding("e", "edit", "Limits"),
        Binding("a", "toggle_revoked", "Show revoked"),
    ]

    def __init__(self, argument: str = "") -> None:
        super().__init__(argument)
        self.include_revoked = False

    def heading(self) -> str:
        return "keys (with revoked)" if self.include_revoked else "keys"

    async def fetch(self) -> list[dict]:
        keys, users, teams = await asyncio.gather(
            self.api.get("/admin/keys", include_revoked=str(self.include_revoked).lower()),
            self.api.get("/admin/users"), self.api.get("/admin/teams"), return_exceptions=True)
        if isinstance(keys, BaseException):
            raise keys
        user_names = {u["id"]: u["name"] for u in users} if isinstance(users, list) else {}
        team_names = {t["id"]: t["name"] for t in teams} if isinstance(teams, list) else {}
        return [k | {"user": user_names.get(k["user_id"], k["user_id"]), "team": team_names.get(k["team_id"], k["team_id"])}
                for k in keys]

    async def open(self, row: dict) -> None:
        key = await self.attempt(self.api.get(f"/admin/keys/{row['id']}"))
        if key is not None:
            await self.app.push_screen(DetailScreen(f"key {key['name']} ({key['id']})", as_yaml(key)))

    def delete_question(self, row: dict) -> str | None:
        if row["state"] == "revoked":
            return None
        return f"Revoke key {row['name']!r} ({row['prefix']}…)? Every request with it is refused from then on."

    async def delete(self, row: dict) -> None:
        await self.attempt(self.api.post(f"/admin/keys/{row['id']}/revoke"), done=f"Key {row['name']} revoked.")

    def action_toggle_revoked(self) -> None:
        self.include_revoked = not self.include_revoked
        self.reload()

    @work(group="action")
    async def action_create(self) -> None:
        async def create(values: dict[str, str]) -> dict:
            body = {k: values[k] for k in ("name", "role", "user", "team", "expires_in") if values[k]}
            return await self.api.post("/admin/keys", body | settings_body(values))

        fields = [Field("name", "Name"), Field("role", "Role (default: the user's, else developer)", choices=ROLES),
                  Field("user", "User it acts for (name or id; optional)"),
                  Field("team", "Team it is billed to (name or id; optional)"),
                  Field("expires_in", "Expires in (like 90d, 24h; empty: never)"), *limit_fields()]
        key = await self.app.push_screen_wait(FormScreen("New API key", fields, create))
        if key is not None:
            await self.app.push_screen_wait(SecretScreen(f"Key {key['name']} ({key['id']}): its secret", key["key"]))
            self.reload()

    @work(group="action")
    async def action_edit(self) -> None:
        row = self.selected
        if row is None:
            return

        async def update(values: dict[str, str]) -> dict:
            return await self.api.patch(f"/admin/keys/{row['id']}", settings_body(values, row))

        await self.form(f"Limits of key {row['name']}", limit_fields(row), update,
                        done=lambda key: f"Key {key['name']} updated.")
