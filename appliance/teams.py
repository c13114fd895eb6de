"""Teams: a name, the limits its keys share (governance.Limits, counted per team) and the
policy its requests follow (governance.Policy, merged with each key's: the stricter wins),
and its members (users). A team's keys are its service keys and its members' keys billed
to it (appliance/keys.py).

`Settings` is how limits and policies change, for teams and keys alike.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from typing import TYPE_CHECKING, get_args

import msgspec
from msgspec import UNSET, UnsetType

from appliance.db import transaction
from appliance.errors import Conflict, InvalidRequest, NotFound, invalid_value
from appliance.governance import (ALL_DETECTORS, NO_LIMITS, NO_POLICY, Count, Limits, Money, Period, PiiAction, Policy,
                                  Priority, RuleAction)
from appliance.users import check_name, find_user

if TYPE_CHECKING:
    import sqlite_utils

ID_PREFIX = "team_"
LIMIT_FIELDS = Limits.__struct_fields__
POLICY_FIELDS = Policy.__struct_fields__
PII_ACTIONS = get_args(PiiAction)


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Changes to the limits and policy of a key or team: a field left out keeps its value,
    null puts it back to its default (no limit, nothing masked or denied)."""

    models: list[str] | None | UnsetType = UNSET  # names or globs; null: every model
    rpm: Count | None | UnsetType = UNSET
    tpm: Count | None | UnsetType = UNSET
    max_parallel: Count | None | UnsetType = UNSET
    budget_tokens: Count | None | UnsetType = UNSET
    budget_cost: Money | None | UnsetType = UNSET
    period: Period | None | UnsetType = UNSET
    priority: Priority | None | UnsetType = UNSET
    no_external: bool | None | UnsetType = UNSET
    pii: dict[str, str] | None | UnsetType = UNSET  # detector (or "*" for every one) -> allow, mask or block
    pii_responses: bool | None | UnsetType = UNSET
    deny: list[str] | None | UnsetType = UNSET
    deny_action: RuleAction | None | UnsetType = UNSET
    injection: RuleAction | None | UnsetType = UNSET
    log_requests: bool | None | UnsetType = UNSET


def settings_given(settings: Settings) -> dict:
    """The fields `settings` sets (null included), for the audit log."""
    return {field: value for field in Settings.__struct_fields__
            if (value := getattr(settings, field)) is not UNSET}


def _pii_rule(name: str, action: str) -> tuple[str, str]:
    """A PII policy's entry: a detector (a kind or short name of appliance.pii, or "*" for
    every one) and its action; a bad one is a 400 naming it as given (pii.NAME)."""
    from appliance import pii  # here, not at import: it loads pyarrow, and every CLI call imports Settings

    try:
        kind = name if name == ALL_DETECTORS else pii.detector(name)
    except InvalidRequest as exc:
        exc.param = f"pii.{name}"
        raise
    if action not in PII_ACTIONS:
        raise InvalidRequest(f"unknown PII action {action!r} for {name!r}: choose one of {', '.join(PII_ACTIONS)}",
                             param=f"pii.{name}")
    return kind, action


def apply_settings(limits: Limits, policy: Policy, settings: Settings) -> tuple[Limits, Policy]:
    """`limits` and `policy` with `settings` applied and checked (400 naming the field)."""
    from appliance.policies import check_policy  # as pii in _pii_rule

    given = settings_given(settings)
    if given.get("models") == []:
        raise InvalidRequest("an empty model list allows no model at all: give null to allow every model "
                             "(or revoke the key)", param="models")
    if given.get("pii"):
        given["pii"] = dict(_pii_rule(name, action) for name, action in given["pii"].items())
    policy = _changed(policy, {k: v for k, v in given.items() if k in POLICY_FIELDS})
    check_policy(policy)
    return _changed(limits, {k: v for k, v in given.items() if k in LIMIT_FIELDS}), policy


def _changed(current, changes: dict):
    values = msgspec.to_builtins(current)
    for field, value in changes.items():
        if value is None:
            values.pop(field, None)
        else:
            values[field] = value
    try:
        return msgspec.convert(values, type(current))
    except msgspec.ValidationError as exc:
        raise invalid_value(exc) from None


class Team(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    limits: Limits
    policy: Policy
    created_at: float
    updated_at: float


_limits = msgspec.json.Decoder(Limits)
_policy = msgspec.json.Decoder(Policy)
_COLUMNS = "id, name, limits, policy, created_at, updated_at"


def _json(settings: Limits | Policy) -> str:
    return msgspec.json.encode(settings).decode()


def _team(row: tuple) -> Team:
    return Team(id=row[0], name=row[1], limits=_limits.decode(row[2]), policy=_policy.decode(row[3]),
                created_at=row[4], updated_at=row[5])


def create_team(db: sqlite_utils.Database, name: str, settings: Settings | None = None, *,
                team_id: str | None = None) -> Team:
    name = check_name(name, "team", ID_PREFIX)
    limits, policy = apply_settings(NO_LIMITS, NO_POLICY, settings or Settings())
    now, team_id = time.time(), team_id or ID_PREFIX + uuid.uuid4().hex[:12]
    try:
        db.execute("INSERT INTO teams (id, name, limits, policy, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                   [team_id, name, _json(limits), _json(policy), now, now])
    except sqlite3.IntegrityError:
        raise Conflict(f"a team named {name!r} already exists", param="name") from None
    return find_team(db, team_id)


def list_teams(db: sqlite_utils.Database) -> list[Team]:
    return [_team(row) for row in db.execute(f"SELECT {_COLUMNS} FROM teams ORDER BY name").fetchall()]


def find_team(db: sqlite_utils.Database, ref: str, *, param: str = "team") -> Team:
    """The team with id (team_...) or name `ref`; 404 naming `param` otherwise."""
    row = db.execute(f"SELECT {_COLUMNS} FROM teams WHERE id = ? OR name = ?", [ref, ref]).fetchone()
    if row is None:
        raise NotFound(f"no team with id or name {ref!r}", param=param)
    return _team(row)


def update_team(db: sqlite_utils.Database, ref: str, settings: Settings, *, name: str | None = None) -> Team:
    """Rename and change limits and policy; the gateway applies it within a second."""
    team = find_team(db, ref)
    limits, policy = apply_settings(team.limits, team.policy, settings)
    name = team.name if name is None else check_name(name, "team", ID_PREFIX)
    try:
        db.execute("UPDATE teams SET name = ?, limits = ?, policy = ?, updated_at = ? WHERE id = ?",
                   [name, _json(limits), _json(policy), time.time(), team.id])
    except sqlite3.IntegrityError:
        raise Conflict(f"a team named {name!r} already exists", param="name") from None
    return find_team(db, team.id)


def members(db: sqlite_utils.Database, team_id: str) -> list[dict]:
    rows = db.execute("SELECT u.id, u.name, u.role FROM team_members m JOIN users u ON u.id = m.user_id "
                      "WHERE m.team_id = ? ORDER BY u.name", [team_id]).fetchall()
    return [{"id": user_id, "name": name, "role": role} for user_id, name, role in rows]


def is_member(db: sqlite_utils.Database, team_id: str, user_id: str) -> bool:
    return db.execute("SELECT 1 FROM team_members WHERE team_id = ? AND user_id = ?",
                      [team_id, user_id]).fetchone() is not None


def add_member(db: sqlite_utils.Database, team_ref: str, user_ref: str) -> tuple[Team, dict]:
    """Make a user a member (adding a member twice changes nothing)."""
    team, user = find_team(db, team_ref), find_user(db, user_ref)
    db.execute("INSERT OR IGNORE INTO team_members (team_id, user_id) VALUES (?, ?)", [team.id, user.id])
    return team, {"id": user.id, "name": user.name}


def _active_keys(db: sqlite_utils.Database, where: str, args: list) -> list[str]:
    return [row[0] for row in db.execute(f"SELECT id FROM api_keys WHERE revoked_at IS NULL AND {where} "
                                         "ORDER BY created_at", args)]


def remove_member(db: sqlite_utils.Database, team_ref: str, user_ref: str) -> tuple[Team, dict]:
    """End a membership; refused (409) while the user has active keys billed to the team."""
    team, user = find_team(db, team_ref), find_user(db, user_ref)
    with transaction(db):  # no key billed to the team is created between the check and the delete
        if not is_member(db, team.id, user.id):
            raise NotFound(f"{user.name!r} is not a member of team {team.name!r}", param="user")
        billed = _active_keys(db, "team_id = ? AND user_id = ?", [team.id, user.id])
        if billed:
            raise Conflict(f"{user.name!r} has active keys billed to team {team.name!r} ({', '.join(billed)}): "
                           "revoke them first", param="user")
        db.execute("DELETE FROM team_members WHERE team_id = ? AND user_id = ?", [team.id, user.id])
    return team, {"id": user.id, "name": user.name}


def team_keys(db: sqlite_utils.Database, team_id: str) -> list[str]:
    """The ids of the team's active keys: its service keys and its members' keys billed to it."""
    return _active_keys(db, "team_id = ?", [team_id])


def delete_team(db: sqlite_utils.Database, ref: str, *, force: bool = False) -> tuple[Team, list[str]]:
    """Delete a team and its memberships; with active keys, refused (409) unless `force`, which
    revokes them. Returns the team and the ids of the keys revoked."""
    team = find_team(db, ref)
    with transaction(db):
        active = team_keys(db, team.id)
        if active and not force:
            raise Conflict(f"team {team.name!r} has {len(active)} active keys ({', '.join(active)}): revoke them, "
                           "or delete with force to revoke them too", param="force")
        db.execute("UPDATE api_keys SET revoked_at = ? WHERE team_id = ? AND revoked_at IS NULL",
                   [time.time(), team.id])
        db.execute("DELETE FROM team_members WHERE team_id = ?", [team.id])
        db.execute("DELETE FROM teams WHERE id = ?", [team.id])
    return team, active


def describe(team: Team) -> dict:
    return msgspec.to_builtins(team)
