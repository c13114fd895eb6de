"""API keys in the admin API: /admin/keys.

A key's secret is answered once, by the call that creates it; nothing else shows it.
Nobody creates or revokes a key of a role above their own (an operator cannot mint an
admin key). The gateway refuses a revoked key within a second (its key cache follows
the database).
"""

from __future__ import annotations

import time

import msgspec
from litestar import Controller, Request, Response, get, post

from appliance import keys
from appliance.audit import Actor
from appliance.durations import parse_duration
from appliance.errors import InvalidRequest
from services.gateway.admin import decoded, request_body, run


class CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    role: str = "developer"  # one of appliance.keys.ROLES, at most the caller's own
    expires_in: str | None = None  # a duration: 90s, 15m, 24h, 7d
    expires_at: float | None = None  # or a Unix time


def _expiry(body: CreateKey) -> float | None:
    if body.expires_in is not None and body.expires_at is not None:
        raise InvalidRequest("give at most one of 'expires_in' and 'expires_at'", param="expires_in")
    if body.expires_in is None:
        return body.expires_at
    try:
        return time.time() + parse_duration(body.expires_in)
    except ValueError as exc:
        raise InvalidRequest(f"expires_in: {exc}", param="expires_in") from None


def _key_detail(key: dict) -> dict:
    return {"name": key["name"], "role": key["role"], "prefix": key["prefix"], "expires_at": key["expires_at"]}


class KeyController(Controller):
    path = "/keys"
    tags = ["keys"]

    @post(opt=request_body(CreateKey))
    async def create_key(self, request: Request, actor: Actor) -> Response:
        """Create a key; the answer holds its secret (`key`), shown this once."""
        body = await decoded(request)
        key_id = keys.new_key_id()

        def work(db) -> dict:
            expires_at = _expiry(body)
            keys.check_grant(actor.role, body.role)
            key, secret = keys.create_key(db, body.name, role=body.role, expires_at=expires_at, key_id=key_id)
            return {**keys.describe(key), "key": secret}

        return await run(request, actor, work, action="key.create", target=f"key/{key_id}", detail=_key_detail,
                         status=201)

    @get()
    async def list_keys(self, request: Request, actor: Actor, include_revoked: bool = False) -> Response:
        """Every key without its secret; revoked ones only with include_revoked=true."""
        return await run(request, actor, lambda db: [keys.describe(k)
                                                     for k in keys.list_keys(db, include_revoked=include_revoked)])

    @post("/{key_id:str}/revoke")
    async def revoke_key(self, request: Request, actor: Actor, key_id: str) -> Response:
        """Revoke by id or displayed prefix (404 for neither); revoking a revoked key changes nothing."""

        def work(db) -> dict:
            keys.check_grant(actor.role, keys.find_key(db, key_id).role, param="key_id")
            return keys.describe(keys.revoke_key(db, key_id))

        return await run(request, actor, work, action="key.revoke", target=f"key/{key_id}",
                         detail=lambda k: {"id": k["id"], "name": k["name"], "role": k["role"]})
