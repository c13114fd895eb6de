"""API keys in the admin API: /admin/keys.

A key's secret is answered once, by the call that creates it; nothing else shows it.
Nobody creates, changes or revokes a key of a role above their own (an operator cannot
mint an admin key). Managers (admin, operator) see and manage every key; the other roles
only their own: their user's keys, or the very key they call with. A key may act for a
user (with at most their role) and be billed to a team; it carries limits and a policy
(appliance/teams.py Settings), changed live with PATCH. The gateway follows every change
within a second (its key cache follows the database).
"""

from __future__ import annotations

import time

import msgspec
from litestar import Controller, Request, Response, get, patch, post
from msgspec import UNSET, UnsetType

from appliance import keys, users
from appliance.audit import Actor
from appliance.durations import parse_duration
from appliance.errors import InvalidRequest, PermissionDenied
from appliance.limits import KEY_SUBJECT
from appliance.teams import Settings
from services.gateway.admin import MANAGER_ROLES, decoded, request_body, run, spending


class CreateKey(Settings, forbid_unknown_fields=True, kw_only=True):
    name: str
    role: str | None = None  # appliance.keys.ROLES, at most the caller's own; default: the user's, else developer
    user: str | None = None  # the user (id or name) it acts for
    team: str | None = None  # the team (id or name) it is billed to; with a user, one of the user's teams
    expires_in: str | None = None  # a duration: 90s, 15m, 24h, 7d
    expires_at: float | None = None  # or a Unix time


class UpdateKey(Settings, forbid_unknown_fields=True, kw_only=True):
    name: str | None = None
    role: str | None = None
    expires_in: str | None = None
    expires_at: float | None | UnsetType = UNSET  # null: never expires


def _expiry(expires_in: str | None, expires_at):
    if expires_in is not None and expires_at not in (None, UNSET):
        raise InvalidRequest("give at most one of 'expires_in' and 'expires_at'", param="expires_in")
    if expires_in is None:
        return expires_at
    try:
        return time.time() + parse_duration(expires_in)
    except ValueError as exc:
        raise InvalidRequest(f"expires_in: {exc}", param="expires_in") from None


def changes_of(body: msgspec.Struct) -> dict:
    """What an update's body sets (every field whose default is None or UNSET), for the audit log."""
    return {field.name: value for field in msgspec.structs.fields(body)
            if (value := getattr(body, field.name)) is not field.default}


def _key_detail(key: dict) -> dict:
    owner = {field: key[field] for field in ("user_id", "team_id", "limits", "policy") if key[field]}
    return {"name": key["name"], "role": key["role"], "prefix": key["prefix"], "expires_at": key["expires_at"], **owner}


def with_spend(described: list[dict], found: list[keys.ApiKey], spend) -> list[dict]:
    """Each key's `described` answer with its budget's `spend` (None without a budget), read at once."""
    return [{**d, "spend": s} for d, s in zip(described, spend([(KEY_SUBJECT + k.id, k.limits) for k in found]))]


def _may_see(actor: Actor, key: keys.ApiKey) -> bool:
    return actor.role in MANAGER_ROLES or key.id == actor.key_id or (
        actor.user_id is not None and key.user_id == actor.user_id)


def _check_own(actor: Actor, key: keys.ApiKey) -> None:
    if not _may_see(actor, key):
        raise PermissionDenied(f"the {actor.role} role manages only its own keys; {key.id} is not one of them",
                               param="key_id")


def _owner(db, actor: Actor, user: str | None) -> str | None:
    """Whom a new key acts for: anyone a manager names; for the other roles, always themselves."""
    if actor.role in MANAGER_ROLES:
        return user
    if actor.user_id is None or (user is not None and users.find_user(db, user).id != actor.user_id):
        raise PermissionDenied(f"the {actor.role} role creates keys only for its own user: sign in as that user "
                               "(`appliance login`) or call with a key of theirs", param="user")
    return actor.user_id


class KeyController(Controller):
    path = "/keys"
    tags = ["keys"]

    @post(opt=request_body(CreateKey))
    async def create_key(self, request: Request, actor: Actor) -> Response:
        """Create a key; the answer holds its secret (`key`), shown this once."""
        body = await decoded(request)
        key_id = keys.new_key_id()

        def work(db) -> dict:
            expires_at = _expiry(body.expires_in, body.expires_at)
            key, secret = keys.create_key(db, body.name, role=body.role, expires_at=expires_at, key_id=key_id,
                                          user=_owner(db, actor, body.user), team=body.team, settings=body,
                                          granted_by=actor.role)
            return {**keys.describe(key), "key": secret}

        return await run(request, actor, work, action="key.create", target=f"key/{key_id}", detail=_key_detail,
                         status=201)

    @get()
    async def list_keys(self, request: Request, actor: Actor, include_revoked: bool = False) -> Response:
        """Every key without its secret, with its budget's `spend` this period (null without a budget);
        revoked ones only with include_revoked=true."""
        spend = spending(request)

        def work(db) -> list[dict]:
            found = [k for k in keys.list_keys(db, include_revoked=include_revoked) if _may_see(actor, k)]
            return with_spend([keys.describe(k) for k in found], found, spend)

        return await run(request, actor, work)

    @get("/{key_id:str}")
    async def show_key(self, request: Request, actor: Actor, key_id: str) -> Response:
        """One key by id, displayed prefix or unique name, with the names of its user and team and its
        budget's `spend` this period (null without a budget)."""
        spend = spending(request)

        def work(db) -> dict:
            key = keys.find_key(db, key_id)
            _check_own(actor, key)
            return with_spend([keys.show_key(db, key.id)], [key], spend)[0]

        return await run(request, actor, work)

    @patch("/{key_id:str}", opt=request_body(UpdateKey))
    async def update_key(self, request: Request, actor: Actor, key_id: str) -> Response:
        """Change a key's name, role, expiry, limits or policy: what the body leaves out stays,
        null puts a field back to its default (no limit, never expires)."""
        body = await decoded(request)
        changes = changes_of(body)

        def work(db) -> dict:
            key = keys.update_key(db, key_id, name=body.name, role=body.role, settings=body, granted_by=actor.role,
                                  expires_at=_expiry(body.expires_in, body.expires_at))
            return keys.describe(key)

        return await run(request, actor, work, action="key.update", target=f"key/{key_id}",
                         detail=lambda k: {"id": k["id"], "changes": changes})

    @post("/{key_id:str}/revoke")
    async def revoke_key(self, request: Request, actor: Actor, key_id: str) -> Response:
        """Revoke by id, displayed prefix or unique name (404 for none); revoking a revoked key changes nothing."""

        def work(db) -> dict:
            key = keys.find_key(db, key_id)
            _check_own(actor, key)
            keys.check_grant(actor.role, key.role, param="key_id")
            return keys.describe(keys.revoke_key(db, key_id))

        return await run(request, actor, work, action="key.revoke", target=f"key/{key_id}",
                         detail=lambda k: {"id": k["id"], "name": k["name"], "role": k["role"]})
