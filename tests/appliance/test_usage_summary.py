"""Usage rows with user, team and cost, written by the real recorder (and its journal) into
a real SQLite file, and summarised by team, user, key and model."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from appliance.db import open_db
from appliance.analytics import summarize
from appliance.usage import UsageRecord, UsageRecorder

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


@pytest.fixture
def spread(tmp_path):
    """2,000 rows over three days at random moments, written in batches by the recorder,
    one batch twice (as a replay after a crash would): the rollups must not count it twice."""
    rng = random.Random(7)
    start = (NOW // 86400 - 3) * 86400
    rows = [UsageRecord(ts=start + rng.uniform(0, 3 * 86400), request_id=f"r{i}", key_id=rng.choice(["k1", "k2"]),
                        model=rng.choice(["local", "gpt"]), endpoint="chat/completions", stream=False,
                        status=rng.choice([200, 200, 200, 429, 502]), prompt_tokens=rng.randint(1, 50),
                        completion_tokens=rng.randint(1, 50), total_tokens=None, latency_ms=rng.uniform(5, 500),
                        ttft_ms=rng.choice([None, 12.5]), cost=rng.choice([None, 0.001]),
                        route=rng.choice([None, "chat"])) for i in range(2000)]
    recorder = UsageRecorder(tmp_path / "state.db", tmp_path / "journal")
    recorder.open()
    for i in range(0, len(rows), 250):
        for record in rows[i:i + 250]:
            recorder.record(record)
        asyncio.run(recorder.flush())
    recorder._write(rows[:300])  # noqa: SLF001 - the rows of a segment already written, replayed
    recorder.close()
    db = open_db(tmp_path / "state.db")
    yield db, start
    db.conn.close()


def by_raw_rows(db, since, until, bucket_sql="0"):
    """The same totals straight from the usage rows."""
    return {(bucket, model): (requests, errors, tokens, round(cost, 9)) for bucket, model, requests, errors, tokens, cost
            in db.execute(f"SELECT {bucket_sql}, model, count(*), sum(status >= 500), coalesce(sum(prompt_tokens), 0), "
                          "coalesce(sum(cost), 0) FROM usage WHERE ts >= ? AND ts < ? GROUP BY 1, 2",
                          [since, until]).fetchall()}


def test_any_range_from_the_rollups_equals_the_rows(spread):
    db, start = spread
    assert db.execute("SELECT count(*) FROM usage").fetchone()[0] == 2000
    rng = random.Random(11)
    for _ in range(40):
        since, until = sorted(start + rng.uniform(-3600, 3 * 86400 + 3600) for _ in range(2))
        open_since, open_until = rng.choice([(False, False), (True, False), (False, True)])
        got = {(0, r["model"]): (r["requests"], r["server_errors"], r["prompt_tokens"], r["cost"])
               for r in summarize(db, since=None if open_since else since, until=None if open_until else until,
                                  by=("model",))}
        assert got == by_raw_rows(db, 0 if open_since else since, NOW + 86400 if open_until else until), \
            (since - start, until - start, open_since, open_until)


@pytest.mark.parametrize(("bucket", "sql", "shape"), [
    ("hour", "CAST(ts / 3600 AS INTEGER) * 3600", "%Y-%m-%dT%H:00:00Z"),
    ("day", "CAST(ts / 86400 AS INTEGER) * 86400", "%Y-%m-%dT00:00:00Z"),
    ("month", "strftime('%s', ts, 'unixepoch', 'start of month')", "%Y-%m-01T00:00:00Z"),
])
def test_buckets_equal_the_rows_grouped_by_hour_day_and_month(spread, bucket, sql, shape):
    db, start = spread
    since = start + 5000.5  # in the middle of an hour: its rest comes from the rows
    want = {(time.strftime(shape, time.gmtime(int(b))), m): v
            for (b, m), v in by_raw_rows(db, since, NOW + 86400, sql).items()}
    for by in (("model",), ("key", "model")):  # the team rollups, and the ones by every grouping
        rows = summarize(db, since=since, by=by, bucket=bucket)
        got: dict = {}
        for r in rows:
            was = got.get((r["bucket"], r["model"]), (0, 0, 0, 0))
            got[(r["bucket"], r["model"])] = (was[0] + r["requests"], was[1] + r["server_errors"],
                                              was[2] + r["prompt_tokens"], round(was[3] + r["cost"], 9))
        assert got == want, by
        assert [r["bucket"] for r in rows] == sorted(r["bucket"] for r in rows)


def test_by_route_and_the_averages(spread):
    db, _ = spread
    rows = {r["route"]: r for r in summarize(db, by=("route",))}
    assert set(rows) == {None, "chat"}
    raw = dict(db.execute("SELECT coalesce(route, ''), round(avg(latency_ms), 1) FROM usage GROUP BY 1").fetchall())
    assert rows["chat"]["avg_latency_ms"] == raw["chat"] and rows[None]["avg_latency_ms"] == raw[""]
    assert rows["chat"]["avg_ttft_ms"] == 12.5


def test_an_unknown_bucket_is_refused(spread):
    with pytest.raises(ValueError, match="bucket must be one of hour, day, month, not 'week'"):
        summarize(spread[0], bucket="week")


def test_the_migration_rolls_up_the_rows_already_there(tmp_path):
    import sqlite3

    import sqlite_utils

    from appliance.db import MIGRATIONS, apply_migrations
    rollups = next(i for i, m in enumerate(MIGRATIONS) if any("usage_hourly" in s for s in m))
    db = sqlite_utils.Database(sqlite3.connect(tmp_path / "state.db", isolation_level=None))
    for number, statements in enumerate(MIGRATIONS[:rollups], 1):
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {number}")
    db.execute("INSERT INTO usage (ts, request_id, key_id, model, endpoint, stream, status, prompt_tokens, "
               "completion_tokens, total_tokens, latency_ms, cost) VALUES "
               "(?, 'a', 'k1', 'local', 'chat/completions', 0, 200, 3, 4, 7, 20.0, 0.5), "
               "(?, 'b', 'k1', 'local', 'chat/completions', 0, 500, 1, 0, 1, 40.0, NULL)", [NOW - 7200, NOW - 60])
    apply_migrations(db)
    [row] = summarize(db, since=(NOW - 7200) // 3600 * 3600, by=("key", "model"))
    assert (row["requests"], row["server_errors"], row["total_tokens"], row["cost"], row["avg_latency_ms"]) == \
        (2, 1, 8, 0.5, 30.0)
    assert db.execute("SELECT sum(requests) FROM usage_daily").fetchone()[0] == 2
