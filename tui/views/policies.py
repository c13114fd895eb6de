"""Every key's and team's policy in one table: PII actions per detector, answers masked, deny
list, injection heuristics, data residency; `e` changes one (the gateway follows within a
second), the API's refusal of a bad detector or pattern shown as it words it."""

from __future__ import annotations

import asyncio
import textwrap
from dataclasses import replace

from textual import work
from textual.binding import Binding

from appliance import pii
from appliance.governance import NO_POLICY, Policy
from tui import format as fmt
from tui.modals import DetailScreen, FormScreen, as_yaml
from tui.view import TableView
from tui.views.settings import POLICY_LABELS, policy_fields, settings_body
from tui.widgets import Column

DEFAULTS = {field: getattr(NO_POLICY, field) for field in Policy.__struct_fields__}


def detectors_text() -> str:
    """The PII detectors a policy may name, with their short names: 'kr_rrn (rrn), email, ...',
    wrapped to fit a form."""
    aliases = {kind: [a for a, k in pii.ALIASES.items() if k == kind] for kind in pii.KINDS}
    names = ", ".join(f"{kind} ({', '.join(aliases[kind])})" if aliases[kind] else kind for kind in pii.KINDS)
    return textwrap.fill(f"Detectors (short names in brackets): {names}", 90)


def deny_text(policy: dict) -> str:
    deny = policy.get("deny") or []
    return f"{len(deny)} {policy.get('deny_action', DEFAULTS['deny_action'])}" if deny else "-"


def policy_text(policy: dict) -> str:
    """A policy in a few words: 'pii phone=mask; deny 2 block; injection flag; no external'."""
    parts = []
    if policy.get("pii"):
        parts.append("pii " + fmt.text(policy["pii"]) + (" (answers too)" if policy.get("pii_responses") else ""))
    if policy.get("deny"):
        parts.append("deny " + deny_text(policy))
    if policy.get("injection", "off") != "off":
        parts.append(f"injection {policy['injection']}")
    if policy.get("no_external"):
        parts.append("no external")
    return "; ".join(parts) or "-"


def full(policy: dict) -> dict:
    """Every rule of `policy`, the defaults included."""
    return {**DEFAULTS, **policy}


class PoliciesView(TableView):
    TITLE = "policies"
    COLUMNS = (
        Column("kind", "KIND"), Column("name", "NAME"), Column("id", "ID"), Column("team", "TEAM"),
        Column("pii", "PII", lambda r: fmt.text(r["policy"].get("pii"))),
        Column("pii_responses", "ANSWERS", lambda r: "masked" if r["policy"].get("pii_responses") else "-"),
        Column("deny", "DENY", lambda r: deny_text(r["policy"])),
        Column("injection", "INJECTION", lambda r: r["policy"].get("injection", DEFAULTS["injection"])),
        Column("no_external", "EXTERNAL", lambda r: "never" if r["policy"].get("no_external") else "allowed"),
    )
    BINDINGS = [
        Binding("enter", "open", "Policy in full"),
        Binding("e", "edit", "Edit policy"),
        Binding("ctrl+d", "delete", "Clear policy"),
    ]

    def __init__(self, argument: str = "") -> None:
        super().__init__(argument)
        self.teams: dict[str, dict] = {}  # by id, as last fetched

    def key(self, row: dict) -> str:
        return f"{row['kind']}/{row['id']}"

    async def fetch(self) -> list[dict]:
        keys, teams = await asyncio.gather(self.api.get("/admin/keys"), self.api.get("/admin/teams"))
        self.teams = {t["id"]: t for t in teams}
        names = {team_id: t["name"] for team_id, t in self.teams.items()}
        # A key's own kind (key, or session: a user signed in) stays its KIND.
        return ([t | {"kind": "team", "team": None} for t in teams]
                + [k | {"team": names.get(k["team_id"], k["team_id"])} for k in keys])

    def path(self, row: dict) -> str:
        return f"/admin/teams/{row['id']}" if row["kind"] == "team" else f"/admin/keys/{row['id']}"

    async def open(self, row: dict) -> None:
        shown = {"kind": row["kind"], "name": row["name"], "id": row["id"], "policy": full(row["policy"])}
        team = self.teams.get(row.get("team_id"))
        if team is not None:
            shown["team"] = team["name"]
            shown["team policy (merged with the key's: the stricter rule wins)"] = full(team["policy"])
        await self.app.push_screen(DetailScreen(f"policy of {row['kind']} {row['name']}", as_yaml(shown)))

    def delete_question(self, row: dict) -> str | None:
        if not row["policy"]:
            return None
        return f"Clear the policy of {row['kind']} {row['name']!r}? Every rule goes back to its default (none)."

    async def delete(self, row: dict) -> None:
        await self.attempt(self.api.patch(self.path(row), dict.fromkeys(POLICY_LABELS)),
                           done=f"Policy of {row['kind']} {row['name']} cleared.")

    @work(group="action")
    async def action_edit(self) -> None:
        row = self.selected
        if row is None:
            return

        async def update(values: dict[str, str]) -> dict:
            body = settings_body(values, row)
            return await self.api.patch(self.path(row), body) if body else row

        fields = [replace(f, label=f"{f.label}\n{detectors_text()}") if f.name == "pii" else f
                  for f in policy_fields(row)]
        what = f"{row['kind']} {row['name']}"
        if await self.app.push_screen_wait(FormScreen(f"Policy of {what}", fields, update)):
            self.notify(f"Policy of {what} saved; the gateway follows within a second.")
            self.reload()
