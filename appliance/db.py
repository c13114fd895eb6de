"""The state database: $APPLIANCE_HOME/state.db, SQLite in WAL mode, versioned by migrations.

Each migration is applied once, in order, inside a transaction; PRAGMA user_version
records how many have run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from appliance.errors import StateError


# Each entry is one schema version: SQL statements run together in one transaction.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL
        )""",
        """CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            key_id TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            total_tokens INTEGER,
            latency_ms REAL,
            ttft_ms REAL
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        "CREATE INDEX usage_key_model ON usage (key_id, model)",
    ),
]


def open_db(path: Path, *, migrate: bool = True) -> sqlite_utils.Database:
    """Open (creating if needed) the state database and bring its schema up to date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute("PRAGMA busy_timeout = 10000")
    db.enable_wal()
    conn.execute("PRAGMA synchronous = NORMAL")
    if migrate:
        apply_migrations(db)
    return db


def schema_version(db: sqlite_utils.Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def apply_migrations(db: sqlite_utils.Database) -> int:
    """Run pending migrations; returns the resulting schema version."""
    current = schema_version(db)
    if current > len(MIGRATIONS):
        raise StateError(
            f"state database schema version {current} is newer than this appliance knows "
            f"({len(MIGRATIONS)}); upgrade the appliance"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) >= version:  # another process migrated meanwhile
                db.execute("COMMIT")
                continue
            for statement in MIGRATIONS[version - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return schema_version(db)
