"""Retention in a real state database: each kind's old rows go, newer ones and the usage
rollups stay, a running job keeps its whole log."""

from __future__ import annotations

import asyncio
import time

from appliance import retention
from appliance.analytics import summarize
from appliance.config import AuditConfig, RetentionConfig
from appliance.db import open_db
from appliance.usage import UsageRecord, UsageRecorder

NOW = time.time()
DAY = 86400


def usage(request_id: str, ago_days: float) -> UsageRecord:
    return UsageRecord(ts=NOW - ago_days * DAY, request_id=request_id, key_id="k", model="m", endpoint="chat/completions",
                       stream=False, status=200, prompt_tokens=3, completion_tokens=4, total_tokens=7, latency_ms=9.0,
                       ttft_ms=None)


def test_each_kind_goes_after_its_own_days_and_the_rollups_stay(tmp_path):
    recorder = UsageRecorder(tmp_path / "state.db", tmp_path / "journal")
    recorder.open()
    for i, ago in enumerate((100, 95, 89, 1)):
        recorder.record(usage(f"u{i}", ago))
    asyncio.run(recorder.flush())
    recorder.close()
    db = open_db(tmp_path / "state.db")
    for job_id, state in (("done", "succeeded"), ("busy", "running")):
        db.execute("INSERT INTO jobs (id, kind, params, state, created_at) VALUES (?, 'finetune', '{}', ?, ?)",
                   [job_id, state, NOW - 60 * DAY])
        for seq, ago in enumerate((40, 31, 2), 1):
            db.execute("INSERT INTO job_logs (job_id, seq, at, text) VALUES (?, ?, ?, 'line')", [job_id, seq, NOW - ago * DAY])
    for i, ago in enumerate((10, 3)):
        db.execute("INSERT INTO request_logs (ts, request_id, model, endpoint, status, request) "
                   "VALUES (?, ?, 'm', 'chat/completions', 200, '{}')", [NOW - ago * DAY, f"r{i}"])
    before = summarize(db, by=("model",))

    deleted = retention.prune(db, RetentionConfig(usage_days=90, request_logs_days=7, job_logs_days=30),
                              AuditConfig(), now=NOW)

    assert {k: v for k, v in deleted.items() if k != "audit"} == {"usage": 2, "request_logs": 1, "job_logs": 2}
    assert [r[0] for r in db.execute("SELECT request_id FROM usage ORDER BY ts")] == ["u2", "u3"]
    assert [r[0] for r in db.execute("SELECT request_id FROM request_logs")] == ["r1"]
    assert db.execute("SELECT job_id, count(*) FROM job_logs GROUP BY 1 ORDER BY 1").fetchall() == [("busy", 3), ("done", 1)]
    assert summarize(db, by=("model",)) == before, "the rollups keep the totals of the rows deleted"
    assert retention.prune(db, RetentionConfig(), AuditConfig(), now=NOW) == {
        "usage": 0, "request_logs": 0, "job_logs": 0, "audit": 0}


def test_many_rows_go_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(retention, "CHUNK", 7)
    db = open_db(tmp_path / "state.db")
    db.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30) "
               "INSERT INTO usage (ts, request_id, model, endpoint, stream, status) SELECT ?, 'r' || i, 'm', 'e', 0, 200 FROM n",
               [NOW - 200 * DAY])
    assert retention.prune(db, RetentionConfig(), AuditConfig(), now=NOW)["usage"] == 30
    assert db.execute("SELECT count(*) FROM usage").fetchone()[0] == 0
