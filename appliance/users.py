"""Users: a name, a role, an optional email and password (an Argon2id hash only), and the
teams they belong to (appliance/teams.py). A user's keys (appliance/keys.py) act with at
most the user's role; a disabled user's keys and sessions are refused until re-enabled;
deleting a user revokes them.
"""

from __future__ import annotations

import re
import sqlite3
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from appliance.db import transaction
from appliance.errors import Conflict, InvalidRequest, NotFound
from appliance.passwords import check_password, hash_password

if TYPE_CHECKING:
    import sqlite_utils

ROLES = ("admin", "operator", "developer", "viewer")  # highest first; keys add the metrics role below them
ID_PREFIX = "usr_"
# Names are what people type (`appliance users show kim`, a login): letters of any script,
# digits and . _ @ -, never an id's prefix (a lookup takes an id or a name).
_NAME = re.compile(r"[\w.@-]{1,64}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


class User(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    role: str
    email: str | None
    has_password: bool  # the hash itself never leaves this module
    created_at: float
    updated_at: float
    disabled_at: float | None = None


_COLUMNS = "id, name, role, email, password_hash IS NOT NULL, created_at, updated_at, disabled_at"


def _user(row: tuple) -> User:
    return User(**dict(zip(User.__struct_fields__, (*row[:4], bool(row[4]), *row[5:]))))


def check_name(name: str, what: str, id_prefix: str) -> str:
    """A user's or team's name, stripped; 400 naming `name` otherwise."""
    name = name.strip()
    if not _NAME.fullmatch(name) or name.startswith(id_prefix):
        raise InvalidRequest(f"a {what} name is 1 to 64 letters, digits or . _ @ - and does not start with "
                             f"{id_prefix!r}; got {name!r}", param="name")
    return name


def check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidRequest(f"unknown user role {role!r}: choose one of {', '.join(ROLES)}", param="role")


def _check_email(email: str | None) -> str | None:
    if email is not None and not _EMAIL.fullmatch(email.strip()):
        raise InvalidRequest(f"not an email address: {email!r}", param="email")
    return email.strip() if email else None


def create_user(db: sqlite_utils.Database, name: str, *, role: str, email: str | None = None,
                password: str | None = None, user_id: str | None = None) -> User:
    name = check_name(name, "user", ID_PREFIX)
    check_role(role)
    email = _check_email(email)
    if password is not None:
        check_password(password)
    now = time.time()
    user_id = user_id or ID_PREFIX + uuid.uuid4().hex[:12]
    try:
        db.execute("INSERT INTO users (id, name, role, email, password_hash, created_at, updated_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [user_id, name, role, email, hash_password(password) if password is not None else None, now, now])
    except sqlite3.IntegrityError:
        raise Conflict(f"a user named {name!r} already exists", param="name") from None
    return find_user(db, user_id)


def list_users(db: sqlite_utils.Database) -> list[User]:
    return [_user(row) for row in db.execute(f"SELECT {_COLUMNS} FROM users ORDER BY name").fetchall()]


def find_user(db: sqlite_utils.Database, ref: str, *, param: str = "user") -> User:
    """The user with id (usr_...) or name `ref`; 404 naming `param` otherwise."""
    row = db.execute(f"SELECT {_COLUMNS} FROM users WHERE id = ? OR name = ?", [ref, ref]).fetchone()
    if row is None:
        raise NotFound(f"no user with id or name {ref!r}", param=param)
    return _user(row)


def password_hash(db: sqlite_utils.Database, name: str) -> tuple[User, str | None] | None:
    """The user named (or with id) `name` and their stored hash, for a sign-in; None for no such user."""
    row = db.execute(f"SELECT {_COLUMNS}, password_hash FROM users WHERE id = ? OR name = ?", [name, name]).fetchone()
    return None if row is None else (_user(row[:-1]), row[-1])


def update_user(db: sqlite_utils.Database, ref: str, *, name: str | None = None, role: str | None = None,
                email: str | None | msgspec.UnsetType = msgspec.UNSET, disabled: bool | None = None) -> User:
    """Change what is given (email None clears it); disabling refuses the user's keys at once."""
    user = find_user(db, ref)
    changes: dict = {}
    if name is not None:
        changes["name"] = check_name(name, "user", ID_PREFIX)
    if role is not None:
        check_role(role)
        changes["role"] = role
    if email is not msgspec.UNSET:
        changes["email"] = _check_email(email)
    if disabled is not None and disabled != (user.disabled_at is not None):
        changes["disabled_at"] = time.time() if disabled else None
    if changes:
        assignments = ", ".join(f"{column} = ?" for column in changes)
        try:
            db.execute(f"UPDATE users SET {assignments}, updated_at = ? WHERE id = ?",
                       [*changes.values(), time.time(), user.id])
        except sqlite3.IntegrityError:
            raise Conflict(f"a user named {changes['name']!r} already exists", param="name") from None
    return find_user(db, user.id)


def set_password(db: sqlite_utils.Database, ref: str, password: str) -> User:
    """Set or replace a user's password, ending their sessions (keys of kind session)."""
    user = find_user(db, ref)
    check_password(password)
    hashed, now = hash_password(password), time.time()
    with transaction(db):
        db.execute("UPDATE users SET password_hash = ?, updated_at = ? WHERE id = ?", [hashed, now, user.id])
        db.execute("UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND kind = 'session' AND revoked_at IS NULL",
                   [now, user.id])
    return find_user(db, user.id)


def user_teams(db: sqlite_utils.Database, user_id: str) -> list[dict]:
    rows = db.execute("SELECT t.id, t.name FROM team_members m JOIN teams t ON t.id = m.team_id "
                      "WHERE m.user_id = ? ORDER BY t.name", [user_id]).fetchall()
    return [{"id": team_id, "name": name} for team_id, name in rows]


def delete_user(db: sqlite_utils.Database, ref: str) -> tuple[User, list[str]]:
    """Delete a user and their memberships, revoking their keys and sessions; returns the user
    and the ids of the keys revoked."""
    user = find_user(db, ref)
    with transaction(db):
        revoked = [row[0] for row in db.execute(
            "SELECT id FROM api_keys WHERE user_id = ? AND revoked_at IS NULL ORDER BY created_at", [user.id])]
        db.execute("UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                   [time.time(), user.id])
        db.execute("DELETE FROM team_members WHERE user_id = ?", [user.id])
        db.execute("DELETE FROM users WHERE id = ?", [user.id])
    return user, revoked


def describe(user: User) -> dict:
    """What the admin API shows of a user: never a password or its hash."""
    return {**msgspec.structs.asdict(user), "state": "disabled" if user.disabled_at is not None else "active"}
