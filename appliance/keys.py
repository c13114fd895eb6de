"""API keys: created once, shown once, stored only as SHA-256 hashes.

Keys are 256-bit random secrets, so a plain SHA-256 is a safe verifier (no password
stretching needed) and is cheap enough to compute on every request.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from pathlib import Path

import msgspec
import sqlite_utils

from appliance import audit
from appliance.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from appliance.files import write_new

ROLES = ("admin", "operator", "developer", "viewer", "metrics")  # highest first
# The lowest role: it reads /metrics, /readyz details and /schema and nothing else (not /v1, not /admin).
METRICS_ROLE = "metrics"
SECRET_PREFIX = "sk-ap-"


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: str
    prefix: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

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


def check_grant(granter: str, role: str, *, param: str = "role") -> None:
    """Nobody hands out or takes away more than they have: `granter` may manage keys of its own role or below."""
    check_role(role)
    if ROLES.index(role) < ROLES.index(granter):
        raise PermissionDenied(f"the {granter} role cannot manage {role} keys, only "
                               f"{', '.join(ROLES[ROLES.index(granter):])} keys", param=param)


def create_key(
    db: sqlite_utils.Database, name: str, *, role: str = "developer", expires_at: float | None = None,
    key_id: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns it and its secret, which is never stored or shown again."""
    check_role(role)
    if not name.strip():
        raise InvalidRequest("a key needs a non-empty name", param="name")
    if expires_at is not None and expires_at <= time.time():
        raise InvalidRequest("the expiry must be in the future", param="expires_at")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=key_id or new_key_id(),
        name=name.strip(),
        role=role,
        prefix=secret[: len(SECRET_PREFIX) + 6],
        created_at=time.time(),
        expires_at=expires_at,
    )
    db["api_keys"].insert({**msgspec.structs.asdict(key), "key_hash": hash_secret(secret)})
    return key, secret


def list_keys(db: sqlite_utils.Database, *, include_revoked: bool = True) -> list[ApiKey]:
    where = None if include_revoked else "revoked_at IS NULL"
    columns = [f for f in ApiKey.__struct_fields__]
    return [ApiKey(**{c: row[c] for c in columns}) for row in db["api_keys"].rows_where(where, order_by="created_at")]


def find_key(db: sqlite_utils.Database, key_id: str) -> ApiKey:
    """The key with id (key_...) or displayed prefix `key_id`."""
    matches = [k for k in list_keys(db) if key_id in (k.id, k.prefix)]
    if not matches:
        raise NotFound(f"no API key with id or prefix {key_id!r}", param="key_id")
    return matches[0]


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
    return {**msgspec.structs.asdict(key), "state": key.state()}


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


class KeyCache:
    """In-memory map of active key hashes, refreshed from the database off the request path."""

    def __init__(self) -> None:
        self._by_hash: dict[str, ApiKey] = {}
        self._fingerprint: tuple | None = None

    def refresh(self, db: sqlite_utils.Database) -> bool:
        """Reload when the keys table changed; returns True if it reloaded. Blocking I/O."""
        fingerprint = tuple(db.execute("SELECT count(*), max(created_at), max(revoked_at) FROM api_keys").fetchone())
        if fingerprint == self._fingerprint:
            return False
        rows = db.execute(
            "SELECT key_hash, id, name, role, prefix, created_at, expires_at, revoked_at FROM api_keys WHERE revoked_at IS NULL"
        ).fetchall()
        self._by_hash = {row[0]: ApiKey(*row[1:]) for row in rows}
        self._fingerprint = fingerprint
        return True

    def authenticate(self, authorization: str | None, *, monitoring: bool = False) -> ApiKey:
        """The active key `authorization` carries (401 otherwise). A metrics key passes only
        when `monitoring` (the monitoring routes ask for it); elsewhere it is a 403."""
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        key = self._by_hash.get(hash_secret(secret.strip()))
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        if key.role == METRICS_ROLE and not monitoring:
            raise PermissionDenied("A metrics key reads only /metrics, /readyz and /schema.")
        return key
