"""Metering: per-request usage rows, batched in memory and written to SQLite off the request path.

Durability: every row is also appended, with one os.write and no fsync, to this process's
journal segment (appliance/home.py usage_journal_dir) before the answer's last bytes go
to the client. A killed process loses nothing the kernel has; a power cut may lose the
rows of the last moments that the kernel had not yet written to disk. Each flush starts
a new segment and deletes the old one once its rows are in the database. A segment is
locked (flock) by its writer while open: at start, every unlocked segment was left by a
dead process and is replayed; request ids are unique, so a replay inserts nothing twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from appliance.analytics import ROLLUP_STATEMENTS
from appliance.db import open_db

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

MAX_PENDING = 100_000  # beyond this, a database that keeps failing drops the oldest rows
SEGMENT_SUFFIX = ".jsonl"
CREATING_SUFFIX = ".new"


class UsageRecord(msgspec.Struct, array_like=True, gc=False):
    ts: float
    request_id: str
    key_id: str | None
    model: str
    endpoint: str
    stream: bool
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    latency_ms: float
    ttft_ms: float | None
    # Added with governance; a journal line written before them has none, and replays with these defaults.
    user_id: str | None = None  # the key's owner, or the caller signed in by an identity provider
    team_id: str | None = None
    cost: float | None = None  # in the profile's currency (appliance/costs.py)
    # Added with the response cache: an answer from it processed no tokens; these are what it saved.
    cached: bool = False
    saved_tokens: int | None = None
    # Added with prompt templates: the template version the gateway rendered ("name:version").
    template: str | None = None
    # Added with analytics: the route the request named, when it named one (services/gateway/routing.py).
    route: str | None = None


_COLUMNS = UsageRecord.__struct_fields__
# A batch goes in as one JSON array of rows, unpacked by SQLite itself: one statement instead of
# one per row, so the writing thread takes Python's GIL twice per batch rather than per row
# (which slowed the request path by several percent under load). The rows it added (ids above
# the largest before it: a replay may bring some twice, which go in once) are then summed into
# the rollups (appliance/analytics.py), in the same transaction.
_INSERT = (
    f"INSERT INTO usage ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join(f'value ->> {i}' for i in range(len(_COLUMNS)))} FROM json_each(?) WHERE true "
    "ON CONFLICT (request_id) DO NOTHING"
)
_HOURS_TABLE = "CREATE TEMP TABLE IF NOT EXISTS usage_batch_hours AS SELECT * FROM main.usage_hourly WHERE false"
_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(UsageRecord).decode
_PROCESS_TOKEN = os.urandom(4).hex()  # a reused pid never names a dead process's segment


class Segment:
    """One journal file, created and locked before it gets its name, so no replay takes it."""

    def __init__(self, directory: Path, number: int):
        self.path = directory / f"{os.getpid()}-{_PROCESS_TOKEN}-{number}{SEGMENT_SUFFIX}"
        creating = self.path.with_suffix(CREATING_SUFFIX)
        self.fd = os.open(creating, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.broken = False  # a write failed: nothing more goes in
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.rename(creating, self.path)

    def append(self, line: bytes) -> None:
        os.write(self.fd, line)

    def drop(self) -> None:
        """Its rows are in the database: delete it, then let go of its lock."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


class UsageRecorder:
    """Collects UsageRecords in memory and in a journal; `flush()` writes them in one batch
    from a worker thread. `open()` (blocking: call it off the event loop) replays what dead
    processes left and starts this process's journal."""

    def __init__(self, db_path: Path, journal_dir: Path):
        self._db_path = db_path
        self._journal_dir = journal_dir
        self._pending: list[UsageRecord] = []
        self._segment: Segment | None = None
        self._sealed: list[Segment] = []  # full segments whose rows are not yet in the database
        self._numbers = itertools.count(1)
        self._db: sqlite_utils.Database | None = None
        self._lock = asyncio.Lock()

    def open(self) -> int:
        """Replay the segments of dead processes; returns how many rows they held."""
        self._journal_dir.mkdir(parents=True, exist_ok=True)
        left = [*self._journal_dir.glob("*" + SEGMENT_SUFFIX), *self._journal_dir.glob("*" + CREATING_SUFFIX)]
        replayed = sum(self._replay(path) for path in sorted(left))  # one still being created is empty
        self._segment = Segment(self._journal_dir, next(self._numbers))
        return replayed

    def _replay(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0  # its writer flushed and deleted it meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live process writes it
            with os.fdopen(os.dup(fd), "rb") as file:
                rows = []
                for line in file:
                    try:
                        rows.append(_decode_line(line))
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("skipping an unreadable line of %s", path)  # cut short by a power cut
            if rows:
                self._write(rows)
                log.info("replayed %d usage rows from %s", len(rows), path.name)
            path.unlink(missing_ok=True)
            return len(rows)
        finally:
            os.close(fd)

    def record(self, record: UsageRecord) -> None:
        self._pending.append(record)
        if self._segment is not None and not self._segment.broken:
            try:
                self._segment.append(_encode(record) + b"\n")
            except OSError as exc:  # a full disk must not fail the answer; the row is still in memory
                self._segment.broken = True  # no more lines after a part of one: a replay reads every whole line
                log.error("the usage journal %s cannot be written (%s): rows wait in memory only until the next "
                          "flush", self._segment.path, exc)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            if self._segment is not None:
                self._sealed.append(self._segment)
                self._segment = Segment(self._journal_dir, next(self._numbers))
            try:
                await asyncio.to_thread(self._commit, batch, self._sealed)
            except Exception:
                log.exception("writing %d usage rows failed; will retry", len(batch))
                self._pending[:0] = batch
                del self._pending[:-MAX_PENDING]
                return
            self._sealed = []

    def _commit(self, batch: list[UsageRecord], sealed: list[Segment]) -> None:
        self._write(batch)
        for segment in sealed:
            segment.drop()

    def _write(self, batch: list[UsageRecord]) -> None:
        if self._db is None:
            self._db = open_db(self._db_path)
            self._db.execute("PRAGMA temp_store = MEMORY")
            self._db.execute(_HOURS_TABLE)
        conn = self._db.conn
        # IMMEDIATE: the write lock before the first read. A deferred transaction that reads
        # first cannot wait for another worker's write; it fails at once ("database is locked").
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()[0]
            conn.execute(_INSERT, [msgspec.json.encode(batch)])
            conn.execute("DELETE FROM temp.usage_batch_hours")
            conn.execute(ROLLUP_STATEMENTS[0], [before])
            for statement in ROLLUP_STATEMENTS[1:]:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """After a final flush: the journal is deleted, unless rows could not be written (the next start replays them)."""
        segments = [*self._sealed, *([self._segment] if self._segment is not None else [])]
        self._segment, self._sealed = None, []
        for segment in segments:
            if self._pending:
                os.close(segment.fd)
            else:
                segment.drop()
        if self._db is not None:
            self._db.conn.close()
            self._db = None
