"""API keys: created once, shown once, stored only as SHA-256 hashes.

Keys are 256-bit random secrets, so a plain SHA-256 is a safe verifier (no password
stretching needed) and is cheap enough to compute on every request.

A key may act for a user (with at most the user's role) and be billed to a team (a
service key, or a member's key); it carries its own limits and policy. The gateway's
KeyCache resolves each active key to a governance.Principal off the request path.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from appliance import audit, teams, users
from appliance.db import transaction
from appliance.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound, PermissionDenied
from appliance.files import write_new
from appliance.governance import NO_LIMITS, NO_POLICY, Limits, Policy, Principal, merge_policies
from appliance.teams import Settings

if TYPE_CHECKING:
    import sqlite_utils

ROLES = (*users.ROLES, "metrics")  # highest first
# The lowest role: it reads /metrics, /readyz details and /schema and nothing else (not /v1, not /admin).
METRICS_ROLE = "metrics"
SECRET_PREFIX = "sk-ap-"
KINDS = ("key", "session")  # a session is a key made by a password sign-in


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    role: str
    prefix: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    kind: str = "key"
    user_id: str | None = None  # the user it acts for (with at most their role)
    team_id: str | None = None  # the team it is billed to: a service key, or a member's key
    limits: Limits = NO_LIMITS
    policy: Policy = NO_POLICY
    updated_at: float | None = None

    def state(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or time.time()):
            return "expired"
        return "active"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_id() -> str:
    return "key_" + uuid.uuid4().hex[:12]


def check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidRequest(f"unknown role {role!r}: choose one of {', '.join(ROLES)}", param="role")


def check_grant(granter: str, role: str, *, param: str = "role", what: str = "keys") -> None:
    """Nobody hands out or takes away more than they have: `granter` may manage keys (or users)
    of its own role or below."""
    check_role(role)
    if ROLES.index(role) < ROLES.index(granter):
        allowed = [r for r in ROLES[ROLES.index(granter):] if what == "keys" or r in users.ROLES]
        raise PermissionDenied(f"the {granter} role cannot manage {role} {what}, only {', '.join(allowed)} {what}",
                               param=param)


def lower_role(*roles: str) -> str:
    return ROLES[max(ROLES.index(role) for role in roles)]


def _check_owner(db: sqlite_utils.Database, role: str, user: users.User | None, team: teams.Team | None) -> None:
    """A new key acts for an enabled user, billed only to one of their teams."""
    if user is None:
        return
    if user.disabled_at is not None:
        raise Conflict(f"user {user.name!r} is disabled: enable them before giving them keys", param="user")
    _check_user_role(role, user)
    if team is not None and not teams.is_member(db, team.id, user.id):
        raise InvalidRequest(f"user {user.name!r} is not a member of team {team.name!r}: add them first "
                             f"(`appliance teams add-member {team.name} {user.name}`)", param="team")


def _check_user_role(role: str, user: users.User) -> None:
    """A user's key has at most the user's role (the gateway also caps it, should the user's role be lowered later)."""
    if lower_role(role, user.role) != role:
        raise PermissionDenied(f"a key of user {user.name!r} has at most their role, {user.role!r}; "
                               f"asked for {role!r}", param="role")


def _check_expiry(expires_at: float | None) -> None:
    if expires_at is not None and expires_at <= time.time():
        raise InvalidRequest("the expiry must be in the future", param="expires_at")


def create_key(
    db: sqlite_utils.Database, name: str, *, role: str | None = None, expires_at: float | None = None,
    key_id: str | None = None, user: str | None = None, team: str | None = None, settings: Settings | None = None,
    kind: str = "key", granted_by: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key, for a user (id or name) and/or billed to a team; its role defaults to the
    user's, else developer, and is at most `granted_by` (the creator's role) where given.
    A user's key names no team only when the user is in none: it is billed to their first team
    by name otherwise, so no member gets out of a team's limits and policy by leaving it out.
    Returns the key and its secret, which is never stored or shown again."""
    owner = users.find_user(db, user) if user is not None else None
    if owner is not None and team is None and (their_teams := users.user_teams(db, owner.id)):
        team = their_teams[0]["id"]
    billed = teams.find_team(db, team) if team is not None else None
    role = role or (owner.role if owner else "developer")
    check_role(role)
    if granted_by is not None:
        check_grant(granted_by, role)
    if kind not in KINDS:
        raise InvalidRequest(f"unknown key kind {kind!r}: choose one of {', '.join(KINDS)}", param="kind")
    if not name.strip():
        raise InvalidRequest("a key needs a non-empty name", param="name")
    _check_expiry(expires_at)
    limits, policy = teams.apply_settings(NO_LIMITS, NO_POLICY, settings or Settings())
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=key_id or new_key_id(), name=name.strip(), role=role, prefix=secret[: len(SECRET_PREFIX) + 6],
        created_at=time.time(), expires_at=expires_at, kind=kind, user_id=owner and owner.id,
        team_id=billed and billed.id, limits=limits, policy=policy,
    )
    with transaction(db):  # the membership checked is the membership the key is stored under
        _check_owner(db, role, owner, billed)
        db["api_keys"].insert({**_row(key), "key_hash": hash_secret(secret)})
    return key, secret


def _row(key: ApiKey) -> dict:
    return {**msgspec.structs.asdict(key), "limits": msgspec.json.encode(key.limits).decode(),
            "policy": msgspec.json.encode(key.policy).decode()}


_FIELDS = ApiKey.__struct_fields__
_limits = msgspec.json.Decoder(Limits)
_policy = msgspec.json.Decoder(Policy)


def _key(row: tuple) -> ApiKey:
    values = dict(zip(_FIELDS, row))
    return ApiKey(**{**values, "limits": _limits.decode(values["limits"]), "policy": _policy.decode(values["policy"])})


def list_keys(db: sqlite_utils.Database, *, include_revoked: bool = True, user_id: str | None = None,
              team_id: str | None = None) -> list[ApiKey]:
    where, args = ["1"], []
    for condition, arg in [("revoked_at IS NULL", None if include_revoked else True), ("user_id = ?", user_id),
                           ("team_id = ?", team_id)]:
        if arg is not None:
            where.append(condition)
            args += [] if arg is True else [arg]
    rows = db.execute(f"SELECT {', '.join(_FIELDS)} FROM api_keys WHERE {' AND '.join(where)} ORDER BY created_at",
                      args).fetchall()
    return [_key(row) for row in rows]


def find_key(db: sqlite_utils.Database, key_id: str) -> ApiKey:
    """The key with id (key_...) or displayed prefix `key_id`, else the one active key of that name
    (409 when several active keys share it)."""
    row = db.execute(f"SELECT {', '.join(_FIELDS)} FROM api_keys WHERE id = ? OR prefix = ? ORDER BY created_at",
                     [key_id, key_id]).fetchone()
    if row is not None:
        return _key(row)
    named = db.execute(f"SELECT {', '.join(_FIELDS)} FROM api_keys WHERE name = ? AND revoked_at IS NULL",
                       [key_id]).fetchall()
    if len(named) > 1:
        raise Conflict(f"{len(named)} active keys are named {key_id!r}: name one by its id "
                       f"({', '.join(r[0] for r in named)})", param="key_id")
    if not named:
        raise NotFound(f"no API key with id, prefix or name {key_id!r}", param="key_id")
    return _key(named[0])


def update_key(db: sqlite_utils.Database, key_id: str, *, name: str | None = None, role: str | None = None,
               expires_at: float | None | msgspec.UnsetType = msgspec.UNSET,
               settings: Settings | None = None, granted_by: str | None = None) -> ApiKey:
    """Rename, change the role (at most the user's), expiry (None: never) and limits and policy
    of an unrevoked key, where `granted_by` (the changer's role, if given) may manage both the
    key's role and the new one; the gateway applies it within a second."""
    key = find_key(db, key_id)
    if granted_by is not None:
        check_grant(granted_by, key.role, param="key_id")
        if role is not None:
            check_grant(granted_by, role)
    if key.revoked_at is not None:
        raise Conflict(f"key {key.id} is revoked: create a new one", param="key_id")
    if name is not None and not name.strip():
        raise InvalidRequest("a key needs a non-empty name", param="name")
    if role is not None:
        check_role(role)
        if key.user_id is not None:
            _check_user_role(role, users.find_user(db, key.user_id))
    if expires_at is not msgspec.UNSET:
        _check_expiry(expires_at)
    limits, policy = teams.apply_settings(key.limits, key.policy, settings or Settings())
    key = msgspec.structs.replace(
        key, name=key.name if name is None else name.strip(), role=role or key.role, limits=limits, policy=policy,
        expires_at=key.expires_at if expires_at is msgspec.UNSET else expires_at, updated_at=time.time())
    row = _row(key)
    changed = ("name", "role", "expires_at", "limits", "policy", "updated_at")
    db.execute(f"UPDATE api_keys SET {', '.join(f'{c} = ?' for c in changed)} WHERE id = ?",
               [*(row[c] for c in changed), key.id])
    return key


def revoke_key(db: sqlite_utils.Database, key_id: str) -> ApiKey:
    """Revoke by id (key_...) or by the displayed prefix; idempotent for revoked keys."""
    key = find_key(db, key_id)
    if key.revoked_at is None:
        now = time.time()
        db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", [now, key.id])
        key = msgspec.structs.replace(key, revoked_at=now)
    return key


def describe(key: ApiKey) -> dict:
    """What the admin API shows of a key: never its secret (only its hash is stored anyway)."""
    return {**msgspec.to_builtins(key), "state": key.state()}


def show_key(db: sqlite_utils.Database, key_id: str) -> dict:
    """`describe`, with the names of its user and team."""
    key = find_key(db, key_id)
    user = db.execute("SELECT name FROM users WHERE id = ?", [key.user_id]).fetchone()
    team = db.execute("SELECT name FROM teams WHERE id = ?", [key.team_id]).fetchone()
    return {**describe(key), "user_name": user and user[0], "team_name": team and team[0]}


def ensure_admin_key(db: sqlite_utils.Database, key_file: Path, *, by: str) -> str | None:
    """On first start, `create_admin_key`; returns its secret so the caller can print it once,
    or None when an active admin key already exists."""
    if any(k.role == "admin" and k.state() == "active" for k in list_keys(db)):
        return None
    return create_admin_key(db, key_file, name="admin (first start)", by=by)


def create_admin_key(db: sqlite_utils.Database, key_file: Path, *, name: str, by: str) -> str:
    """Create an admin key, write its secret to key_file (mode 0600) and audit it as done `by`
    a local command: one that has no key to call the admin API with."""
    key, secret = create_key(db, name, role="admin")
    audit.record(db, audit.Actor(None, by, None), "key.create", f"key/{key.id}",
                 detail={"name": key.name, "role": key.role, "prefix": key.prefix, "expires_at": None})
    key_file.parent.mkdir(parents=True, exist_ok=True)
    write_new(key_file, (secret + "\n").encode())
    return secret


class _Entry(NamedTuple):
    principal: Principal
    expires_at: float | None
    user_disabled: bool  # its user is disabled (or gone)


# Anything that changes a key's principal changes one of these: a key created, revoked or
# updated; a team or user created, deleted or updated.
_FINGERPRINT = """SELECT (SELECT count(*) FROM api_keys), (SELECT max(created_at) FROM api_keys),
    (SELECT max(revoked_at) FROM api_keys), (SELECT max(updated_at) FROM api_keys),
    (SELECT count(*) FROM teams), (SELECT max(updated_at) FROM teams),
    (SELECT count(*) FROM users), (SELECT max(updated_at) FROM users)"""
_ACTIVE = """SELECT k.key_hash, k.id, k.name, k.role, k.expires_at, k.user_id, k.team_id, k.limits, k.policy,
    u.id, u.role, u.disabled_at, t.name, t.limits, t.policy
    FROM api_keys k LEFT JOIN users u ON u.id = k.user_id LEFT JOIN teams t ON t.id = k.team_id
    WHERE k.revoked_at IS NULL"""


def _entry(row: tuple) -> _Entry:
    (_, key_id, name, role, expires_at, user_id, team_id, limits, policy,
     found_user, user_role, disabled_at, team_name, team_limits, team_policy) = row
    key_policy = _policy.decode(policy)
    return _Entry(
        Principal(key_id=key_id, name=name, role=lower_role(role, user_role) if user_role else role, user_id=user_id,
                  team_id=team_id, team_name=team_name, limits=_limits.decode(limits),
                  team_limits=_limits.decode(team_limits) if team_limits else NO_LIMITS,
                  policy=merge_policies(key_policy, _policy.decode(team_policy)) if team_policy else key_policy),
        expires_at, user_id is not None and (found_user is None or disabled_at is not None))


class UnknownKey(AuthenticationFailed):
    """A key the cache does not hold: wrong, revoked, or made since the cache was read."""


class KeyCache:
    """In-memory map of active key hashes to who they are (governance.Principal: role, owner,
    limits, merged policy), refreshed from the database off the request path."""

    def __init__(self) -> None:
        self._by_hash: dict[str, _Entry] = {}
        self._fingerprint: tuple | None = None

    def refresh(self, db: sqlite_utils.Database) -> bool:
        """Reload when keys, teams or users changed; returns True if it reloaded. Blocking I/O."""
        fingerprint = tuple(db.execute(_FINGERPRINT).fetchone())
        if fingerprint == self._fingerprint:
            return False
        self._by_hash = {row[0]: _entry(row) for row in db.execute(_ACTIVE).fetchall()}
        self._fingerprint = fingerprint
        return True

    def authenticate(self, authorization: str | None, *, monitoring: bool = False) -> Principal:
        """Who the active key `authorization` carries is (401 otherwise). A metrics key passes only
        when `monitoring` (the monitoring routes ask for it); elsewhere it is a 403."""
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        entry = self._by_hash.get(hash_secret(secret.strip()))
        if entry is None:
            raise UnknownKey("Incorrect API key provided.")
        if entry.expires_at is not None and entry.expires_at <= time.time():
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        if entry.user_disabled:
            raise AuthenticationFailed("The user this API key belongs to is disabled.", code="user_disabled")
        if entry.principal.role == METRICS_ROLE and not monitoring:
            raise PermissionDenied("A metrics key reads only /metrics, /readyz and /schema.")
        return entry.principal
