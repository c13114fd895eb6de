"""The hash-chained audit log on real SQLite files: verify names the first edited, deleted,
reordered or re-hashed row; concurrent writers in separate processes keep one chain;
retention keeps it checkable; export and the hot path's queue."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from appliance import audit, retention
from appliance.audit import Actor, AuditQueue
from appliance.config import AuditConfig, RetentionConfig
from appliance.db import MIGRATIONS, open_db

ALICE = Actor("key_a", "alice", "admin", "req-1", user_id="user_a", team_id="team_a")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path):
    database = open_db(tmp_path / "state.db")
    yield database
    database.conn.close()


def fill(db, n: int, *, ts: float | None = None) -> None:
    audit.append(db, [audit.Entry(ts or time.time(), ALICE, "key.create", f"key/{i}", detail={"i": i, "name": "키"})
                      for i in range(n)])


def raw(db, sql: str, params=()) -> None:
    """Tampering: SQL straight at the file, as someone with access to it could."""
    db.execute(sql, params)


def test_a_long_chain_verifies_and_records_every_column(db):
    fill(db, 500)
    audit.record(db, ALICE, "model.register", "model/smol", outcome="refused: exists", detail={"sha": "ab"})
    result = audit.verify(db)
    assert (result.ok, result.rows, result.first_id, result.last_id) == (True, 501, 1, 501)
    last = audit.entries(db, limit=1)[0]
    assert result.head_hash == last["hash"]
    assert (last["key_id"], last["key_name"], last["role"], last["request_id"], last["user_id"], last["team_id"]) == \
        ("key_a", "alice", "admin", "req-1", "user_a", "team_a")
    assert (last["outcome"], last["detail"]) == ("refused: exists", {"sha": "ab"})
    first = db.execute("SELECT prev_hash FROM audit_log WHERE id = 1").fetchone()[0]
    assert first == audit.GENESIS


def test_an_edited_row_is_named(db):
    fill(db, 50)
    raw(db, "UPDATE audit_log SET detail = ? WHERE id = 17", ['{"i": 999}'])
    result = audit.verify(db)
    assert (result.ok, result.bad_id, result.problem, result.rows) == (False, 17, "edited", 16)
    assert "row 17" in result.reason


def test_an_edited_actor_or_timestamp_is_named(db):
    fill(db, 20)
    raw(db, "UPDATE audit_log SET team_id = 'team_b' WHERE id = 20")
    assert (audit.verify(db).bad_id, audit.verify(db).problem) == (20, "edited")
    raw(db, "UPDATE audit_log SET ts = ts - 1 WHERE id = 3")
    assert audit.verify(db).bad_id == 3


def test_a_deleted_row_is_named(db):
    fill(db, 50)
    raw(db, "DELETE FROM audit_log WHERE id = 30")
    result = audit.verify(db)
    assert (result.ok, result.bad_id, result.problem) == (False, 31, "deleted")
    assert "row 30 is missing" in result.reason


def test_the_deleted_first_row_is_named(db):
    fill(db, 5)
    raw(db, "DELETE FROM audit_log WHERE id IN (1, 2)")
    result = audit.verify(db)
    assert (result.bad_id, result.problem) == (3, "deleted")
    assert "rows 1 to 2 are missing" in result.reason


def test_swapped_rows_are_named(db):
    fill(db, 50)
    raw(db, "UPDATE audit_log SET id = -1 WHERE id = 20")
    raw(db, "UPDATE audit_log SET id = 20 WHERE id = 21")
    raw(db, "UPDATE audit_log SET id = 21 WHERE id = -1")
    result = audit.verify(db)
    assert (result.ok, result.bad_id, result.problem) == (False, 20, "reordered")
    assert "written as row 21" in result.reason


def test_an_edited_hash_is_named(db):
    fill(db, 50)
    raw(db, "UPDATE audit_log SET hash = ? WHERE id = 42", ["f" * 64])
    result = audit.verify(db)
    assert (result.ok, result.bad_id, result.problem) == (False, 42, "hash_edited")


def test_a_rewritten_row_with_a_fresh_hash_breaks_the_next_link(db):
    fill(db, 10)
    row = db.execute(f"SELECT {', '.join(audit.COLUMNS)} FROM audit_log WHERE id = 5").fetchone()
    forged = (*row[:audit.COLUMNS.index("outcome")], "ok, honestly", *row[audit.COLUMNS.index("detail"):])
    raw(db, "UPDATE audit_log SET outcome = ?, hash = ? WHERE id = 5", [forged[10], audit.row_hash(forged)])
    result = audit.verify(db)
    assert (result.bad_id, result.problem) == (6, "unlinked")


def test_a_row_inserted_around_the_code_is_named(db):
    fill(db, 10)
    raw(db, "INSERT INTO audit_log (ts, action, target, outcome) VALUES (?, 'key.revoke', 'key/x', 'ok')", [time.time()])
    assert (audit.verify(db).bad_id, audit.verify(db).problem) == (11, "unhashed")
    audit.record(db, ALICE, "key.create", "key/y")  # the chain goes on, and the hole stays visible
    assert audit.verify(db).bad_id == 11


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from appliance import audit
    from appliance.db import open_db
    db = open_db(Path(sys.argv[1]))
    for i in range(int(sys.argv[3])):
        audit.record(db, audit.Actor(None, sys.argv[2], None), "test.write", f"w/{sys.argv[2]}/{i}")
""")


def test_concurrent_writers_in_separate_processes_keep_one_chain(db, tmp_path):
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "state.db"), f"p{n}", "150"], cwd=ROOT)
               for n in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 4
    result = audit.verify(db)
    assert (result.ok, result.rows, result.last_id) == (True, 600, 600)
    counts = dict(db.execute("SELECT key_name, count(*) FROM audit_log GROUP BY key_name").fetchall())
    assert counts == {f"p{n}": 150 for n in range(4)}
    interleaved = [r[0] for r in db.execute("SELECT key_name FROM audit_log ORDER BY id")]
    assert interleaved != sorted(interleaved), "the writers ran one after the other: no concurrency was tested"


def test_a_record_inside_the_callers_transaction_goes_with_it(db):
    fill(db, 3)
    db.execute("BEGIN IMMEDIATE")
    audit.record(db, ALICE, "key.create", "key/rolled-back")
    db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    audit.record(db, ALICE, "key.create", "key/kept")
    db.execute("COMMIT")
    assert [e["target"] for e in audit.entries(db, limit=2)] == ["key/kept", "key/2"]
    assert audit.verify(db).ok


def test_prune_keeps_the_chain_verifiable_and_later_edits_are_found(db):
    old = time.time() - 400 * 86400
    fill(db, 30, ts=old)
    fill(db, 20)
    assert retention.prune(db, RetentionConfig(), AuditConfig())["audit"] == 30
    result = audit.verify(db)
    assert (result.ok, result.first_id, result.pruned_through, result.rows) == (True, 31, 30, 21)
    prune_row = audit.entries(db, limit=1)[0]
    assert (prune_row["action"], prune_row["detail"]["through_id"], prune_row["detail"]["rows"]) == ("audit.prune", 30, 30)
    assert retention.prune(db, RetentionConfig(), AuditConfig())["audit"] == 0  # nothing more to prune: nothing recorded either
    assert audit.entries(db, limit=1)[0]["id"] == prune_row["id"]

    raw(db, "UPDATE audit_log SET outcome = 'error' WHERE id = 35")
    assert (audit.verify(db).bad_id, audit.verify(db).problem) == (35, "edited")


def test_prune_stops_at_the_first_row_still_in_the_retention_window(db):
    fill(db, 5, ts=time.time() - 10)
    fill(db, 1, ts=time.time())
    fill(db, 5, ts=time.time() - 10)  # written later, stamped earlier (a queued row): kept with its neighbours
    assert audit.prune(db, time.time() - 5) == 5
    assert audit.verify(db).first_id == 6


def test_deleting_the_oldest_kept_rows_after_a_prune_is_named(db):
    fill(db, 10, ts=time.time() - 100)
    fill(db, 10)
    audit.prune(db, time.time() - 50)
    raw(db, "DELETE FROM audit_log WHERE id = 11")
    assert (audit.verify(db).bad_id, audit.verify(db).problem) == (12, "deleted")


def test_a_moved_anchor_is_named(db):
    fill(db, 10, ts=time.time() - 100)
    fill(db, 10)
    audit.prune(db, time.time() - 50)
    # Hide rows 11 and 12 by pretending retention took them: the anchor no longer matches its prune row.
    h12 = db.execute("SELECT hash FROM audit_log WHERE id = 12").fetchone()[0]
    raw(db, "DELETE FROM audit_log WHERE id IN (11, 12)")
    raw(db, "UPDATE audit_anchor SET through_id = 12, hash = ?", [h12])
    result = audit.verify(db)
    assert (result.ok, result.problem) == (False, "anchor")
    raw(db, "DELETE FROM audit_anchor")
    assert audit.verify(db).problem == "anchor"


def test_rows_from_before_the_chain_are_sealed_by_the_first_write(tmp_path):
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in (s for migration in MIGRATIONS[:5] for s in migration):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    for i in range(3):
        conn.execute("INSERT INTO audit_log (ts, key_name, action, target, outcome) VALUES (?, 'old', 'key.create', ?, 'ok')",
                     [time.time(), f"key/{i}"])
    conn.close()
    db = open_db(path)  # migration 6
    result = audit.verify(db)
    assert (result.ok, result.unsealed, result.rows) == (True, 3, 0)
    audit.record(db, ALICE, "key.revoke", "key/1")
    result = audit.verify(db)
    assert (result.ok, result.unsealed, result.rows, result.first_id) == (True, 0, 5, 1)
    assert [e["action"] for e in audit.entries(db, limit=2)] == ["key.revoke", "audit.seal"]
    raw(db, "UPDATE audit_log SET key_name = 'new' WHERE id = 2")
    assert audit.verify(db).bad_id == 2
    db.conn.close()


def test_export_streams_every_column_and_the_chain(db):
    now = time.time()
    fill(db, 3, ts=now - 100)
    fill(db, 2, ts=now)
    rows = list(audit.export(db))
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
    assert set(rows[0]) == {*audit.COLUMNS, "hash"}
    assert rows[0]["detail"] == {"i": 0, "name": "키"}
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert [r["id"] for r in audit.export(db, since=now - 50)] == [4, 5]
    assert [r["id"] for r in audit.export(db, until=now - 50)] == [1, 2, 3]
    assert [r["id"] for r in audit.export(db, after_id=1, limit=2)] == [2, 3]
    # A SIEM can re-check each exported row (detail is stored as sorted, compact-enough JSON text).
    stored = db.execute("SELECT detail FROM audit_log WHERE id = 1").fetchone()[0]
    assert json.loads(stored) == rows[0]["detail"]
    assert audit.row_hash([rows[0][c] if c != "detail" else stored for c in audit.COLUMNS]) == rows[0]["hash"]


def test_the_queue_writes_in_one_batch_and_keeps_rows_a_failed_write_could_not_store(db, tmp_path):
    queue = AuditQueue(limit=5)
    for i in range(3):
        queue.add(ALICE, "policy.block", f"model/m{i}", outcome="refused: rrn", detail={"rule": "rrn"})
    broken = tmp_path / "not-a-dir"
    broken.write_text("")
    assert asyncio.run(queue.flush(broken / "state.db")) == 0
    assert queue.pending == 3
    for i in range(3, 7):
        queue.add(ALICE, "policy.flag", f"model/m{i}")  # 7 rows, room for 5: the 2 oldest go
    assert queue.pending == 5
    assert asyncio.run(queue.flush(tmp_path / "state.db")) == 6
    assert queue.pending == 0
    written = list(audit.export(db))
    assert [r["action"] for r in written][:2] == ["audit.dropped", "policy.block"]
    assert written[0]["detail"] == {"rows": 2}
    assert [r["target"] for r in written[1:]] == [f"model/m{i}" for i in range(2, 7)]
    assert audit.verify(db).ok
    assert asyncio.run(queue.flush(tmp_path / "state.db")) == 0
