"""`appliance backup snapshot|check-rows|restore-snapshot` on real state databases: the copy an
upgrade takes while a gateway may be writing, its check of the migrated rows, and putting it
back on a roll-back."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

from appliance.db import open_db
from appliance.snapshots import ROWS_FILE
from appliance.teams import create_team
from tests.conftest import BIN


def backup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "appliance"), "backup", *args], capture_output=True, text=True)


def teams(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return sorted(name for (name,) in conn.execute("SELECT name FROM teams"))
    finally:
        conn.close()


def test_a_snapshot_holds_what_was_committed_is_checked_and_put_back(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    db = open_db(home / "state.db")
    create_team(db, "research")
    db.conn.close()
    # A writer in the middle of a transaction: the snapshot has only what was committed.
    writer = sqlite3.connect(home / "state.db")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO teams (id, name, created_at, updated_at) VALUES ('t-x', 'uncommitted', 0, 0)")
    snapshot = tmp_path / "snap"
    taken = backup("snapshot", str(snapshot), "--home", str(home))
    writer.rollback()
    writer.close()
    assert taken.returncode == 0, taken.stderr
    assert teams(snapshot / "state.db") == ["research"]
    rows = json.loads((snapshot / ROWS_FILE).read_text())
    assert rows["state.db"]["teams"] == 1 and rows["jobs.db"] == {}, "no job queue yet: nothing of it kept"
    assert not (snapshot / "jobs.db").exists()

    again = backup("snapshot", str(snapshot), "--home", str(home))
    assert again.returncode != 0 and "exists already" in again.stderr

    # More rows pass the check; fewer fail it, naming the table.
    db = open_db(home / "state.db")
    create_team(db, "sales")
    assert backup("check-rows", str(snapshot), "--home", str(home)).stdout.startswith("all ")
    db.conn.execute("DELETE FROM teams WHERE name = 'research'")
    db.conn.execute("DELETE FROM teams WHERE name = 'sales'")
    db.conn.commit()
    db.conn.close()
    lost = backup("check-rows", str(snapshot), "--home", str(home))
    assert lost.returncode != 0 and "state.db teams: 1 rows before, 0 after" in lost.stderr, lost.stderr

    # Put back: the snapshot's rows, no stale WAL, and a database the snapshot lacked is gone.
    (home / "jobs.db").write_bytes(b"made after the snapshot")
    done = backup("restore-snapshot", str(snapshot), "--home", str(home))
    assert done.returncode == 0, done.stderr
    assert teams(home / "state.db") == ["research"]
    assert not (home / "state.db-wal").exists() and not (home / "jobs.db").exists()


def test_restore_snapshot_refuses_a_folder_that_is_not_one(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "other").mkdir()
    refused = backup("restore-snapshot", str(tmp_path / "other"), "--home", str(tmp_path / "home"))
    assert refused.returncode != 0 and f"{tmp_path / 'other'} is not a snapshot (no readable rows.json)" in refused.stderr


def test_tables_the_appliance_empties_itself_are_not_checked(tmp_path):
    """Retention prunes usage at a new gateway's first tick, and workers consume the job queue."""
    home, snapshot = tmp_path / "home", tmp_path / "snap"
    home.mkdir()
    open_db(home / "state.db").conn.close()
    snapshot.mkdir()
    (snapshot / ROWS_FILE).write_text(json.dumps({"state.db": {"usage": 5, "audit_log": 3, "teams": 0},
                                                  "jobs.db": {"task": 2}}))
    kept = backup("check-rows", str(snapshot), "--home", str(home))
    assert kept.returncode == 0 and kept.stdout.strip() == "all 0 rows of the snapshot kept", kept.stdout + kept.stderr
