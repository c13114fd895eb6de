"""Usage rows with user, team and cost, written by the real recorder (and its journal) into
a real SQLite file, and summarised by team, user, key and model."""

from __future__ import annotations

import asyncio
import time

import pytest

from appliance.db import open_db
from appliance.usage import UsageRecord, UsageRecorder, summarize

NOW = time.time()


def row(request_id, key_id, user_id, team_id, model, tokens, cost, *, ago=60.0, status=200) -> UsageRecord:
    return UsageRecord(ts=NOW - ago, request_id=request_id, key_id=key_id, model=model, endpoint="chat/completions",
                       stream=False, status=status, prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2,
                       total_tokens=tokens, latency_ms=10.0, ttft_ms=None, user_id=user_id, team_id=team_id, cost=cost)


@pytest.fixture
def db(tmp_path):
    db = open_db(tmp_path / "state.db")
    db.execute("INSERT INTO users (id, name, role, created_at, updated_at) VALUES "
               "('u1', 'alice', 'developer', 0, 0), ('u2', 'bob', 'developer', 0, 0)")
    db.execute("INSERT INTO teams (id, name, created_at, updated_at) VALUES ('t1', 'risk', 0, 0)")
    db.execute("INSERT INTO api_keys (id, name, role, key_hash, prefix, created_at, user_id, team_id) VALUES "
               "('k1', 'alice-laptop', 'developer', 'h1', 'p1', 0, 'u1', 't1'), "
               "('k2', 'alice-ci', 'developer', 'h2', 'p2', 0, 'u1', 't1'), "
               "('k3', 'bob-key', 'developer', 'h3', 'p3', 0, 'u2', NULL)")
    recorder = UsageRecorder(tmp_path / "state.db", tmp_path / "journal")
    recorder.open()
    for record in [
        row("r1", "k1", "u1", "t1", "local", 100, 0.5),
        row("r2", "k2", "u1", "t1", "gpt", 40, 1.25),
        row("r3", "k3", "u2", None, "gpt", 10, 0.25, status=429),
        row("r4", None, "u2", "t1", "local", 6, 0.125),  # a JWT caller of the team
        row("r5", "k1", "u1", "t1", "local", 1000, 5.0, ago=3 * 86400),  # long ago
    ]:
        recorder.record(record)
    asyncio.run(recorder.flush())
    recorder.close()
    yield db
    db.conn.close()


def totals(rows, *columns):
    return {tuple(r[c] for c in columns): (r["requests"], r["total_tokens"], r["cost"]) for r in rows}


def test_by_team_user_key_and_model(db):
    since = NOW - 86400
    assert totals(summarize(db, since=since, by=("team",)), "team_id", "team_name") == {
        ("t1", "risk"): (3, 146, 1.875), (None, None): (1, 10, 0.25)}
    assert totals(summarize(db, since=since, by=("user",)), "user_name") == {
        ("alice",): (2, 140, 1.75), ("bob",): (2, 16, 0.375)}
    assert totals(summarize(db, since=since, by=("key",)), "key_name") == {
        ("alice-laptop",): (1, 100, 0.5), ("alice-ci",): (1, 40, 1.25), ("bob-key",): (1, 10, 0.25),
        (None,): (1, 6, 0.125)}
    assert totals(summarize(db, by=("model",)), "model") == {("local",): (3, 1106, 5.625), ("gpt",): (2, 50, 1.5)}
    both = summarize(db, since=since, by=("team", "model"))
    assert totals(both, "team_name", "model") == {
        ("risk", "local"): (2, 106, 0.625), ("risk", "gpt"): (1, 40, 1.25), (None, "gpt"): (1, 10, 0.25)}
    assert {r["errors"] for r in both if r["team_name"] is None} == {1}


def test_only_ones_own(db):
    assert totals(summarize(db, by=("key",), user_id="u1"), "key_id") == {
        ("k1",): (2, 1100, 5.5), ("k2",): (1, 40, 1.25)}
    assert totals(summarize(db, by=("model",), key_id="k3"), "model") == {("gpt",): (1, 10, 0.25)}
    assert summarize(db, by=("model",), key_id="nobody") == []


def test_an_unknown_grouping_is_refused(db):
    with pytest.raises(ValueError, match="cannot group usage by colour"):
        summarize(db, by=("team", "colour"))


def test_journal_lines_from_before_the_cost_columns_replay(tmp_path):
    journal = tmp_path / "journal"
    journal.mkdir()
    (journal / "1-dead-1.jsonl").write_bytes(
        b'[1.5,"old-1","k1","m","chat/completions",false,200,1,2,3,4.5,null]\n'
        b'[2.5,"new-1","k1","m","chat/completions",true,200,1,2,3,4.5,1.0,"u1","t1",0.25]\n')
    recorder = UsageRecorder(tmp_path / "state.db", journal)
    assert recorder.open() == 2
    recorder.close()
    db = open_db(tmp_path / "state.db")
    try:
        rows = [dict(r) for r in db.query("SELECT request_id, user_id, team_id, cost FROM usage ORDER BY ts")]
    finally:
        db.conn.close()
    assert rows == [{"request_id": "old-1", "user_id": None, "team_id": None, "cost": None},
                    {"request_id": "new-1", "user_id": "u1", "team_id": "t1", "cost": 0.25}]
