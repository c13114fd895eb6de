"""The audit log: every change made through /admin (and every policy refusal and login the
gateway reports), who made it, and how it ended; a hash chain that shows any edit.

Each row's `hash` is SHA-256 over a canonical encoding of all its other columns, `id` and
`prev_hash` included; `prev_hash` is the previous row's hash (GENESIS for the first). A row
is appended inside one BEGIN IMMEDIATE transaction, so writers in several processes never
fork the chain. `verify` walks it and names the first row that is edited, missing, moved or
unlinked. Retention (`prune`) deletes the oldest rows and keeps the chain checkable from the
oldest kept row through the anchor in audit_anchor (migration 6), which an `audit.prune`
row in the chain vouches for. Rows written before the chain existed (through
audit_anchor.unsealed_through) are sealed into it by the first write after the upgrade.
docs/audit.md says what this does and does not protect against.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from appliance.db import open_db, transaction
from appliance.errors import StateError

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the prev_hash of the first row (also in migration 6's anchor)
HASH_FORMAT = "audit/1"  # first element of every encoded row: a new encoding gets a new name
# Every column but `hash`, in the order they are hashed (and exported).
COLUMNS = ("id", "ts", "request_id", "key_id", "key_name", "role", "user_id", "team_id", "action", "target",
           "outcome", "detail", "prev_hash")
_PREV, _HASH = COLUMNS.index("prev_hash"), len(COLUMNS)  # positions in a row read as COLUMNS + hash
_SELECT = f"SELECT {', '.join(COLUMNS)}, hash FROM audit_log"
_INSERT = f"INSERT INTO audit_log ({', '.join(COLUMNS)}, hash) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
REORDER_WINDOW = 64  # how far from its place `verify` looks for a moved row's true id
MAX_PENDING = 10_000  # AuditQueue: beyond this a database that keeps failing loses the oldest rows (counted)


class Actor(msgspec.Struct, frozen=True):
    """Who is asking: the API key (or signed-in user) behind a call, and the call's request id."""

    key_id: str | None
    key_name: str | None
    role: str | None
    request_id: str | None = None
    user_id: str | None = None
    team_id: str | None = None


SYSTEM = Actor(None, "audit log", None)  # the chain's own rows: sealing, dropped rows, retention


class Entry(msgspec.Struct, frozen=True):
    """One row to append, stamped when it happened (not when it is written)."""

    ts: float
    actor: Actor
    action: str
    target: str
    outcome: str = "ok"
    detail: dict | None = None


class Verification(msgspec.Struct, kw_only=True):
    """What `verify` found. `problem` is one of: edited, hash_edited, reordered, deleted,
    unlinked, unhashed, anchor; `bad_id` is the first bad row (None for an empty log)."""

    ok: bool
    rows: int  # chained rows checked (up to the first bad one)
    first_id: int | None  # the oldest row kept
    last_id: int | None
    head_hash: str | None  # the newest row's hash: kept elsewhere, it shows a later truncation
    pruned_through: int  # rows up to this id were removed by retention
    unsealed: int = 0  # rows from before the chain, not yet sealed into it
    bad_id: int | None = None
    problem: str | None = None
    reason: str | None = None


_encode = msgspec.json.Encoder().encode


def row_hash(values: Iterable) -> str:
    """SHA-256 (hex) of [HASH_FORMAT, *the row's COLUMNS values] as compact UTF-8 JSON
    (what Python's json.dumps with separators=(",", ":") and ensure_ascii=False writes too)."""
    return hashlib.sha256(_encode((HASH_FORMAT, *values))).hexdigest()


# --- writing -----------------------------------------------------------------------------


def record(db: sqlite_utils.Database, actor: Actor, action: str, target: str, *, outcome: str = "ok",
           detail: dict | None = None) -> None:
    append(db, [Entry(time.time(), actor, action, target, outcome, detail)])


def append(db: sqlite_utils.Database, entries: list[Entry]) -> None:
    """Chain `entries` onto the log in one transaction (a savepoint in the caller's, if it holds one)."""
    with _writing(db):
        _seal_unsealed(db)
        _append(db, entries)


@contextlib.contextmanager
def _writing(db: sqlite_utils.Database) -> Iterator[None]:
    """The write lock for reading the chain's tail and appending to it: BEGIN IMMEDIATE, or
    a savepoint when the caller already holds a transaction (then its commit decides)."""
    if not db.conn.in_transaction:
        with transaction(db):
            yield
        return
    db.execute("SAVEPOINT audit_append")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK TO audit_append")
        db.execute("RELEASE audit_append")
        raise
    db.execute("RELEASE audit_append")


def _anchor(db: sqlite_utils.Database) -> tuple[int, str, int]:
    """(through_id, hash, unsealed_through) of audit_anchor."""
    anchor = db.execute("SELECT through_id, hash, unsealed_through FROM audit_anchor WHERE id = 1").fetchone()
    if anchor is None:
        raise StateError("the audit log's anchor (table audit_anchor) is gone: the audit log was tampered with; "
                         "`appliance audit verify` says more")
    return anchor


def _append(db: sqlite_utils.Database, entries: list[Entry]) -> None:
    last = db.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    prev_id, prev_hash = last if last else _anchor(db)[:2]
    rows = []
    for e in entries:
        a = e.actor
        values = (prev_id + 1, float(e.ts), a.request_id, a.key_id, a.key_name, a.role, a.user_id, a.team_id,
                  e.action, e.target, e.outcome, json.dumps(e.detail, sort_keys=True) if e.detail else None,
                  prev_hash)
        prev_id, prev_hash = values[0], row_hash(values)
        rows.append((*values, prev_hash))
    db.conn.executemany(_INSERT, rows)


def _seal_unsealed(db: sqlite_utils.Database) -> None:
    """Chain the rows written before the chain existed, once, and say so in the chain."""
    through_id, prev_hash, unsealed_through = _anchor(db)
    if not unsealed_through:
        return
    rows = db.execute(f"{_SELECT} WHERE id <= ? AND hash IS NULL ORDER BY id", [unsealed_through]).fetchall()
    sealed = []
    for row in rows:
        values = (*row[:_PREV], prev_hash)
        prev_hash = row_hash(values)
        sealed.append((values[_PREV], prev_hash, row[0]))
    db.conn.executemany("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE id = ?", sealed)
    db.execute("UPDATE audit_anchor SET unsealed_through = 0, updated_at = ? WHERE id = 1", [time.time()])
    if sealed:
        _append(db, [Entry(time.time(), SYSTEM, "audit.seal", "audit",
                           detail={"rows": len(sealed), "through_id": sealed[-1][2]})])


# --- retention ---------------------------------------------------------------------------


def prune(db: sqlite_utils.Database, older_than: float, *, actor: Actor = SYSTEM) -> int:
    """Delete the oldest rows, those before the first row stamped at or after `older_than`
    (the chain loses only a prefix), anchor the chain at the last one deleted, and audit it.
    Returns how many rows were deleted."""
    with _writing(db):
        _seal_unsealed(db)
        newer = db.execute("SELECT min(id) FROM audit_log WHERE ts >= ?", [older_than]).fetchone()[0]
        limit = newer - 1 if newer is not None else db.execute("SELECT max(id) FROM audit_log").fetchone()[0]
        last = db.execute("SELECT id, hash FROM audit_log WHERE id <= ? ORDER BY id DESC LIMIT 1",
                          [limit or 0]).fetchone()
        if last is None:
            return 0
        through_id, through_hash = last
        deleted = db.execute("DELETE FROM audit_log WHERE id <= ?", [through_id]).rowcount
        db.execute("UPDATE audit_anchor SET through_id = ?, hash = ?, updated_at = ? WHERE id = 1",
                   [through_id, through_hash, time.time()])
        _append(db, [Entry(time.time(), actor, "audit.prune", "audit",
                           detail={"through_id": through_id, "hash": through_hash, "rows": deleted,
                                   "older_than": older_than})])
    return deleted


# --- verifying ---------------------------------------------------------------------------


def verify(db: sqlite_utils.Database) -> Verification:
    """Walk the chain in id order, one row at a time, from the retention anchor; report the
    first bad row and why, or that it is intact."""
    own = not db.conn.in_transaction
    if own:
        db.execute("BEGIN")  # one snapshot: the anchor and the rows as of the same moment
    try:
        return _walk(db)
    finally:
        if own:
            db.execute("COMMIT")


def _walk(db: sqlite_utils.Database) -> Verification:
    try:
        through_id, anchor_hash, unsealed_through = _anchor(db)
    except StateError as exc:
        return Verification(ok=False, rows=0, first_id=None, last_id=None, head_hash=None, pruned_through=0,
                            problem="anchor", reason=exc.message)
    prev_id, prev_hash = through_id, anchor_hash
    checked = unsealed = 0
    first_id = last = None
    vouched = through_id == 0  # a prune's anchor must be named by its audit.prune row
    rows = db.execute(f"{_SELECT} ORDER BY id")
    row = next(rows, None)
    while row is not None:
        following = next(rows, None)
        first_id = row[0] if first_id is None else first_id
        if row[0] <= unsealed_through and row[_HASH] is None:
            unsealed += 1
        else:
            found = _check(db, row, following, prev_id, prev_hash, through_id)
            if found:
                return Verification(ok=False, rows=checked, first_id=first_id, last_id=None, head_hash=None,
                                    pruned_through=through_id, unsealed=unsealed, bad_id=row[0], problem=found[0],
                                    reason=found[1])
            checked += 1
            vouched = vouched or _vouches(row, through_id, anchor_hash)
            prev_hash = row[_HASH]
        prev_id, last = row[0], row
        row = following
    if not vouched:
        return Verification(ok=False, rows=checked, first_id=first_id, last_id=None, head_hash=None,
                            pruned_through=through_id, unsealed=unsealed, bad_id=first_id, problem="anchor",
                            reason=f"the retention anchor (rows through {through_id} pruned) is not the one an "
                                   "audit.prune row records: it was changed")
    return Verification(ok=True, rows=checked, first_id=first_id, last_id=last and last[0],
                        head_hash=last and last[_HASH], pruned_through=through_id, unsealed=unsealed)


def _check(db, row: tuple, following: tuple | None, prev_id: int, prev_hash: str, through_id: int):
    """(problem, reason) for a row that does not hold, else None."""
    row_id, stored = row[0], row[_HASH]
    if stored is None:
        return "unhashed", f"row {row_id} has no hash: it was written around the audit log, or its hash removed"
    actual = row_hash(row[:_HASH])
    if actual != stored:
        original = _original_id(db, row)
        if original is not None:
            return "reordered", f"row {row_id} holds the entry written as row {original}: rows were reordered"
        if following is not None and following[_PREV] == actual:
            return "hash_edited", (f"row {row_id}'s hash was changed: its content still matches the link "
                                   f"from row {following[0]}")
        return "edited", f"row {row_id} was edited: its content does not match its hash"
    if row[_PREV] != prev_hash:
        previous = f"row {prev_id}" if prev_id > through_id else "the start of the chain"
        if row_id > prev_id + 1:
            missing = f"row {prev_id + 1} is" if row_id == prev_id + 2 else f"rows {prev_id + 1} to {row_id - 1} are"
            return "deleted", f"{missing} missing (deleted): row {row_id} does not link to {previous}"
        return "unlinked", (f"row {row_id} does not link to {previous}: one of them was rewritten with a fresh "
                            "hash, or rows were reordered")
    return None


def _original_id(db, row: tuple) -> int | None:
    """The id a moved row was written with: one near its place, or after the row its prev_hash names."""
    candidates = set(range(max(1, row[0] - REORDER_WINDOW), row[0] + REORDER_WINDOW + 1))
    named = db.execute("SELECT id FROM audit_log WHERE hash = ? LIMIT 1", [row[_PREV]]).fetchone()
    if named:
        candidates.add(named[0] + 1)
    candidates.discard(row[0])
    for candidate in sorted(candidates, key=lambda c: abs(c - row[0])):
        if row_hash((candidate, *row[1:_HASH])) == row[_HASH]:
            return candidate
    return None


def _vouches(row: tuple, through_id: int, anchor_hash: str) -> bool:
    if row[COLUMNS.index("action")] != "audit.prune" or not row[COLUMNS.index("detail")]:
        return False
    detail = json.loads(row[COLUMNS.index("detail")])
    return detail.get("through_id") == through_id and detail.get("hash") == anchor_hash


# --- reading -----------------------------------------------------------------------------


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


def export(db: sqlite_utils.Database, since: float | None = None, until: float | None = None, *,
           after_id: int = 0, limit: int | None = None) -> Iterator[dict]:
    """Rows stamped in [since, until), oldest first, streamed: every column, `detail` as an
    object, and the chain's prev_hash and hash (a SIEM can re-check them)."""
    where, params = ["id > ?"], [after_id]
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY id" + (" LIMIT ?" if limit is not None else "")
    for row in db.execute(sql, params + ([limit] if limit is not None else [])):
        item = dict(zip((*COLUMNS, "hash"), row))
        item["detail"] = json.loads(item["detail"]) if item["detail"] else None
        yield item


# --- the hot path's queue ----------------------------------------------------------------


class AuditQueue:
    """Audit rows from the event loop (policy refusals and flags, logins): `add` keeps them in
    memory, with no I/O; `flush` chains them into the database in one transaction on a worker
    thread. Rows a failing write could not store stay for the next flush; past `limit` the
    oldest are dropped, and the next write records how many in an `audit.dropped` row."""

    def __init__(self, limit: int = MAX_PENDING):
        self.limit = limit
        self._pending: collections.deque[Entry] = collections.deque(maxlen=limit)
        self._dropped = 0
        self._lock = asyncio.Lock()

    def add(self, actor: Actor, action: str, target: str, *, outcome: str = "ok", detail: dict | None = None) -> None:
        if len(self._pending) == self.limit:
            self._dropped += 1  # the deque drops its oldest
        self._pending.append(Entry(time.time(), actor, action, target, outcome, detail))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self, db_path: Path) -> int:
        """Write what is pending; returns how many rows were written (0 after a failure, logged)."""
        async with self._lock:
            if not self._pending and not self._dropped:
                return 0
            batch, dropped = list(self._pending), self._dropped
            self._pending.clear()
            self._dropped = 0
            note = [Entry(time.time(), SYSTEM, "audit.dropped", "audit", detail={"rows": dropped})] if dropped else []
            try:
                await asyncio.to_thread(_append_to, db_path, note + batch)
            except Exception:
                log.exception("writing %d audit rows failed; will retry", len(batch))
                kept = batch + list(self._pending)
                overflow = max(0, len(kept) - self.limit)
                self._pending = collections.deque(kept[overflow:], maxlen=self.limit)
                self._dropped += dropped + overflow
                return 0
            return len(note) + len(batch)


def _append_to(db_path: Path, entries: list[Entry]) -> None:
    db = open_db(db_path, migrate=False)
    try:
        append(db, entries)
    finally:
        db.conn.close()
