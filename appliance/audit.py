"""The audit log: every change made through /admin, who made it, and how it ended."""

from __future__ import annotations

import json
import time

import msgspec
import sqlite_utils


class Actor(msgspec.Struct, frozen=True):
    """Who is asking: the API key behind an /admin call, and the call's request id."""

    key_id: str | None
    key_name: str | None
    role: str | None
    request_id: str | None = None


def record(db: sqlite_utils.Database, actor: Actor, action: str, target: str, *, outcome: str = "ok",
           detail: dict | None = None) -> None:
    db.execute(
        "INSERT INTO audit_log (ts, request_id, key_id, key_name, role, action, target, outcome, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [time.time(), actor.request_id, actor.key_id, actor.key_name, actor.role, action, target, outcome,
         json.dumps(detail, sort_keys=True) if detail else None],
    )


def entries(db: sqlite_utils.Database, *, limit: int = 100, action: str | None = None,
            target: str | None = None) -> list[dict]:
    where, params = [], []
    if action:
        where.append("action = ?")
        params.append(action)
    if target:
        where.append("target LIKE ?")
        params.append(target + "%")
    sql = "SELECT * FROM audit_log" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
    rows = [dict(r) for r in db.query(sql, [*params, limit])]
    for row in rows:
        row["detail"] = json.loads(row["detail"]) if row["detail"] else None
    return rows
