"""Copies of a home's databases at one moment: what an upgrade takes before it changes
anything, checks the migrated databases against, and puts back when it rolls back."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from appliance import retention
from appliance.errors import BackupError
from appliance.home import DATABASES, JOBS_DB, STATE_DB

ROWS_FILE = "rows.json"  # in a snapshot: database -> table -> rows when it was taken
# Tables the appliance empties itself as it runs, so fewer rows there say nothing about a
# migration: retention's (a new gateway prunes at once), the audit log's own retention,
# alerts that clear, and the whole job queue (Huey's tasks are consumed).
SHRINKING = {STATE_DB: {*(table for table, _ in retention.KINDS.values()), "audit_log", "alerts"}}


def row_counts(db: Path) -> dict[str, int]:
    """Rows in each table ({} for no database); SQLite's, Litestream's and full-text index tables left out."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                  if not name.startswith(("sqlite_", "_litestream_")) and "_fts" not in name]
        return {name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in tables}
    finally:
        conn.close()


def take(home: Path, dest: Path) -> dict[str, dict[str, int]]:
    """Copy each database of `home` into the folder `dest` with SQLite's online backup
    (consistent while a gateway writes); returns, and keeps in rows.json, its row counts."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in DATABASES:
        db = home / name
        rows[name] = row_counts(db)
        if db.exists():
            src, copy = sqlite3.connect(db), sqlite3.connect(dest / name)
            try:
                with copy:
                    src.backup(copy)
            finally:
                src.close()
                copy.close()
    (dest / ROWS_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _rows_at(snapshot: Path) -> dict[str, dict[str, int]]:
    try:
        return json.loads((snapshot / ROWS_FILE).read_text())
    except (OSError, ValueError):
        raise BackupError(f"{snapshot} is not a snapshot (no readable {ROWS_FILE})") from None


def put_back(snapshot: Path, home: Path) -> None:
    """Make `home`'s databases the snapshot's again. Nothing may have them open: stop the appliance first."""
    _rows_at(snapshot)
    for name in DATABASES:
        db = home / name
        for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            extra.unlink(missing_ok=True)
        kept = snapshot / name
        if kept.exists():
            tmp = db.with_name(db.name + ".restoring")
            shutil.copyfile(kept, tmp)
            tmp.replace(db)
        else:
            db.unlink(missing_ok=True)


def lost_rows(snapshot: Path, home: Path) -> tuple[int, list[str]]:
    """The rows the snapshot held in the tables that only grow, and each of those tables
    of `home` that now holds fewer."""
    checked = {name: {table: n for table, n in tables.items() if table not in SHRINKING.get(name, ())}
               for name, tables in _rows_at(snapshot).items() if name != JOBS_DB}
    lost = []
    for name, tables in checked.items():
        after = row_counts(home / name)
        lost += [f"{name} {table}: {n} rows before, {after.get(table, 0)} after"
                 for table, n in tables.items() if after.get(table, 0) < n]
    return sum(sum(tables.values()) for tables in checked.values()), lost
