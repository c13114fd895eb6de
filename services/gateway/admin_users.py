"""Users in the admin API: /admin/users.

Nobody creates, changes or deletes a user of a role above their own, nor gives a user
such a role. Answers and the audit log never hold a password or its hash. Deleting a user
revokes their keys and sessions (the answer lists them); disabling one refuses them until
re-enabled. Team membership is managed under /admin/teams/{name}/members.
"""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from msgspec import UNSET, UnsetType

from appliance import keys, users
from appliance.audit import Actor
from appliance.errors import Conflict
from services.gateway.admin import decoded, request_body, run
from services.gateway.admin_keys import changes_of


class CreateUser(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    role: str  # admin, operator, developer or viewer; at most the caller's own
    email: str | None = None
    password: str | None = None  # for `POST /auth/login`; none: the user signs in with keys only


class UpdateUser(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str | None = None
    role: str | None = None
    email: str | None | UnsetType = UNSET  # null clears it
    disabled: bool | None = None  # true refuses the user's keys and sessions at once


class SetPassword(msgspec.Struct, forbid_unknown_fields=True):
    password: str


def _user_detail(user: dict) -> dict:
    return {"id": user["id"], "name": user["name"], "role": user["role"], "email": user["email"],
            "has_password": user["has_password"]}


def _check_manages(actor: Actor, db, ref: str) -> users.User:
    """The user `ref`, if the caller may manage their role."""
    user = users.find_user(db, ref)
    keys.check_grant(actor.role, user.role, param="user", what="users")
    return user


class UserController(Controller):
    path = "/users"
    tags = ["users"]

    @post(opt=request_body(CreateUser))
    async def create_user(self, request: Request, actor: Actor) -> Response:
        """Create a user, with a password for `POST /auth/login` if given."""
        body = await decoded(request)

        def work(db) -> dict:
            users.check_role(body.role)
            keys.check_grant(actor.role, body.role, what="users")
            return users.describe(users.create_user(db, body.name, role=body.role, email=body.email,
                                                    password=body.password))

        return await run(request, actor, work, action="user.create", target=f"user/{body.name}", detail=_user_detail,
                         status=201)

    @get()
    async def list_users(self, request: Request, actor: Actor) -> Response:
        return await run(request, actor, lambda db: [users.describe(u) for u in users.list_users(db)])

    @get("/{name:str}")
    async def show_user(self, request: Request, actor: Actor, name: str) -> Response:
        """A user (by id or name) with their teams and active keys."""

        def work(db) -> dict:
            found = users.find_user(db, name)
            return {**users.describe(found), "teams": users.user_teams(db, found.id),
                    "keys": [keys.describe(k) for k in keys.list_keys(db, include_revoked=False, user_id=found.id)]}

        return await run(request, actor, work)

    @patch("/{name:str}", opt=request_body(UpdateUser))
    async def update_user(self, request: Request, actor: Actor, name: str) -> Response:
        """Rename, change role or email, disable (`disabled: true`) or enable a user."""
        body = await decoded(request)
        changes = changes_of(body)

        def work(db) -> dict:
            _check_manages(actor, db, name)
            if body.role is not None:
                users.check_role(body.role)
                keys.check_grant(actor.role, body.role, what="users")
            return users.describe(users.update_user(db, name, name=body.name, role=body.role, email=body.email,
                                                    disabled=body.disabled))

        return await run(request, actor, work, action="user.update", target=f"user/{name}",
                         detail=lambda u: {"id": u["id"], "changes": changes})

    @post("/{name:str}/password", opt=request_body(SetPassword), status_code=200)
    async def set_password(self, request: Request, actor: Actor, name: str) -> Response:
        """Set (or replace) a user's password; their sessions end (their keys stay)."""
        body = await decoded(request)

        def work(db) -> dict:
            _check_manages(actor, db, name)
            return users.describe(users.set_password(db, name, body.password))

        return await run(request, actor, work, action="user.password", target=f"user/{name}",
                         detail=lambda u: {"id": u["id"], "name": u["name"]})

    @delete("/{name:str}", status_code=200)
    async def delete_user(self, request: Request, actor: Actor, name: str) -> Response:
        """Delete a user and their memberships; their keys and sessions are revoked (`revoked_keys`)."""

        def work(db) -> dict:
            found = _check_manages(actor, db, name)
            if actor.user_id == found.id:
                raise Conflict("you cannot delete the user you are signed in as", param="name")
            deleted, revoked = users.delete_user(db, found.id)
            return {**users.describe(deleted), "revoked_keys": revoked}

        return await run(request, actor, work, action="user.delete", target=f"user/{name}",
                         detail=lambda u: {**_user_detail(u), "revoked_keys": u["revoked_keys"]})
