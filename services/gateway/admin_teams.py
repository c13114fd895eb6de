"""Teams in the admin API: /admin/teams, and their members: /admin/teams/{name}/members.

A team's limits are shared by all its keys, and its policy (PII, deny list, injection,
no external transfer) merges with each key's, the stricter winning; PATCH changes them
live (the gateway follows within a second). A team with active keys is deleted only with
force=true, which revokes them; a member with active keys billed to the team stays until
those keys are revoked.
"""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post

from appliance import keys, teams
from appliance.audit import Actor
from appliance.limits import KEY_SUBJECT, TEAM_SUBJECT
from appliance.teams import Settings
from services.gateway.admin import decoded, request_body, run, spending
from services.gateway.admin_keys import changes_of


class CreateTeam(Settings, forbid_unknown_fields=True, kw_only=True):
    name: str


class UpdateTeam(Settings, forbid_unknown_fields=True, kw_only=True):
    name: str | None = None


class Member(msgspec.Struct, forbid_unknown_fields=True):
    user: str  # id or name


def _team_detail(team: dict) -> dict:
    return {"id": team["id"], "name": team["name"], "limits": team["limits"], "policy": team["policy"]}


def _membership(team: teams.Team, user: dict) -> dict:
    return {"team": {"id": team.id, "name": team.name}, "user": user}


class TeamController(Controller):
    path = "/teams"
    tags = ["teams"]

    @post(opt=request_body(CreateTeam))
    async def create_team(self, request: Request, actor: Actor) -> Response:
        """Create a team with the limits its keys share and the policy its requests follow."""
        body = await decoded(request)
        return await run(request, actor, lambda db: teams.describe(teams.create_team(db, body.name, body)),
                         action="team.create", target=f"team/{body.name}", detail=_team_detail, status=201)

    @get()
    async def list_teams(self, request: Request, actor: Actor) -> Response:
        """Every team with its budget's `spend` this period (null without a budget)."""
        spend = spending(request)

        def work(db) -> list[dict]:
            found = teams.list_teams(db)
            spent = spend([(TEAM_SUBJECT + t.id, t.limits) for t in found])
            return [{**teams.describe(t), "spend": s} for t, s in zip(found, spent)]

        return await run(request, actor, work)

    @get("/{name:str}")
    async def show_team(self, request: Request, actor: Actor, name: str) -> Response:
        """A team (by id or name) with its members and active keys, each with its budget's `spend`
        this period (null without a budget)."""
        spend = spending(request)

        def work(db) -> dict:
            found = teams.find_team(db, name)
            billed = keys.list_keys(db, include_revoked=False, team_id=found.id)
            # one read of the ledger: the team's counter and its keys', as of the same moment
            spent = spend([(TEAM_SUBJECT + found.id, found.limits), *((KEY_SUBJECT + k.id, k.limits) for k in billed)])
            return {**teams.describe(found), "spend": spent[0], "members": teams.members(db, found.id),
                    "keys": [{**keys.describe(k), "spend": s} for k, s in zip(billed, spent[1:])]}

        return await run(request, actor, work)

    @patch("/{name:str}", opt=request_body(UpdateTeam))
    async def update_team(self, request: Request, actor: Actor, name: str) -> Response:
        """Rename, or change limits and policy: what the body leaves out stays, null puts a field
        back to its default (no limit, nothing masked or denied)."""
        body = await decoded(request)
        changes = changes_of(body)
        return await run(request, actor, lambda db: teams.describe(teams.update_team(db, name, body, name=body.name)),
                         action="team.update", target=f"team/{name}",
                         detail=lambda t: {"id": t["id"], "changes": changes})

    @delete("/{name:str}", status_code=200)
    async def delete_team(self, request: Request, actor: Actor, name: str, force: bool = False) -> Response:
        """Delete a team and its memberships; 409 while it has active keys, unless force=true,
        which revokes them (`revoked_keys`)."""

        def work(db) -> dict:
            deleted, revoked = teams.delete_team(db, name, force=force)
            return {**teams.describe(deleted), "revoked_keys": revoked}

        return await run(request, actor, work, action="team.delete", target=f"team/{name}",
                         detail=lambda t: {**_team_detail(t), "revoked_keys": t["revoked_keys"]})

    @post("/{name:str}/members", opt=request_body(Member), status_code=200)
    async def add_member(self, request: Request, actor: Actor, name: str) -> Response:
        """Make a user (id or name) a member; adding a member again changes nothing."""
        body = await decoded(request)
        return await run(request, actor, lambda db: _membership(*teams.add_member(db, name, body.user)),
                         action="team.add_member", target=f"team/{name}", detail=lambda m: m)

    @delete("/{name:str}/members/{user:str}", status_code=200)
    async def remove_member(self, request: Request, actor: Actor, name: str, user: str) -> Response:
        """End a membership; 409 while the user has active keys billed to the team."""
        return await run(request, actor, lambda db: _membership(*teams.remove_member(db, name, user)),
                         action="team.remove_member", target=f"team/{name}", detail=lambda m: m)
