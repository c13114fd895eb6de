"""Request logs: the requests and answers of the keys and teams whose policy says log_requests
(off by default), kept in table request_logs with personal data masked, for
retention.request_logs_days (appliance/retention.py), and found by request id.

What is kept: the request body as the engine got it (after the caller's policy), and the
answer: a whole answer's JSON, or a streamed answer's text. Every string in them is masked
with every PII detector (appliance/pii.py), whatever the caller's policy masks in flight,
and each is cut at MAX_CHARS characters.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import msgspec

from appliance.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    import sqlite_utils

MAX_CHARS = 65_536
COLUMNS = ("ts", "request_id", "key_id", "user_id", "team_id", "model", "endpoint", "status", "latency_ms",
           "request", "response")
LISTED = ("id", "ts", "request_id", "key_id", "user_id", "team_id", "model", "endpoint", "status", "latency_ms")


# Keys whose string values are the API's own words, never a person's: left unscanned.
PLAIN_KEYS = frozenset({"id", "object", "model", "role", "finish_reason", "system_fingerprint", "type"})


def masked(value: Any) -> Any:
    """`value` (decoded JSON) with every string masked (but those of PLAIN_KEYS)."""
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, list):
        return [masked(v) for v in value]
    if isinstance(value, dict):
        return {k: v if k in PLAIN_KEYS and isinstance(v, str) else masked(v) for k, v in value.items()}
    return value


def _mask(text: str) -> str:
    pii = _pii()
    return text if pii.ordinary(text) else pii.mask_text(text)[0]


@functools.cache
def _pii():
    from appliance import pii  # here, not at import: it loads pyarrow

    return pii


def logged_json(raw: bytes) -> str:
    """A JSON body as kept: masked, and cut at MAX_CHARS (a body that is not JSON is kept as masked text)."""
    try:
        text = msgspec.json.encode(masked(msgspec.json.decode(raw))).decode()
    except msgspec.DecodeError:
        text = _mask(raw.decode("utf-8", "replace"))
    return text[:MAX_CHARS]


def logged_text(text: str) -> str:
    return _mask(text)[:MAX_CHARS]


def insert(db: sqlite_utils.Database, rows: list[tuple]) -> None:
    """Rows of COLUMNS, each once (a request id already kept is left as it is)."""
    db.conn.executemany(f"INSERT INTO request_logs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                        "ON CONFLICT (request_id) DO NOTHING", rows)


def get(db: sqlite_utils.Database, request_id: str) -> dict:
    row = db.execute("SELECT * FROM request_logs WHERE request_id = ?", [request_id]).fetchone()
    if row is None:
        raise NotFound(f"No request {request_id!r} is in the request logs (only the requests of keys and teams "
                       "whose policy says log_requests are kept, for retention.request_logs_days).", param="request_id")
    found = dict(zip([d[0] for d in db.execute("SELECT * FROM request_logs LIMIT 0").description], row))
    for field in ("request", "response"):
        if found[field] is not None and found[field].startswith(("{", "[")):
            found[field] = json.loads(found[field])
    return found


def search(db: sqlite_utils.Database, *, since: float | None = None, team_id: str | None = None,
           key_id: str | None = None, model: str | None = None, status: int | None = None,
           limit: int = 100) -> list[dict]:
    """The kept requests, newest first, without their bodies."""
    if limit < 1:
        raise InvalidRequest("limit must be at least 1", param="limit")
    conditions, params = [], []
    for condition, value in (("ts >= ?", since), ("team_id = ?", team_id), ("key_id = ?", key_id),
                             ("model = ?", model), ("status = ?", status)):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    cursor = db.execute(f"SELECT {', '.join(LISTED)} FROM request_logs {where} ORDER BY ts DESC LIMIT ?",
                        [*params, limit])
    return [dict(zip(LISTED, row)) for row in cursor.fetchall()]

