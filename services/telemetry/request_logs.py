"""Request logs as kept (appliance/request_logs.py): the raw records the gateway sent,
masked and written to the request_logs table."""

from __future__ import annotations

from pathlib import Path

from appliance import request_logs
from appliance.db import open_db, transaction
from services.gateway.shadow import answer_text
from services.telemetry.frames import LogRecord


def write(db_path: Path, records: list[LogRecord]) -> None:
    rows = [(r.ts, r.request_id, r.key_id, r.user_id, r.team_id, r.model, r.endpoint, r.status, r.latency_ms,
             request_logs.logged_json(r.request), _answer(r.answer, r.stream)) for r in records]
    db = open_db(db_path, migrate=False)
    try:
        with transaction(db):
            request_logs.insert(db, rows)
    finally:
        db.conn.close()


def _answer(answer: bytes | None, stream: bool) -> str | None:
    if answer is None:
        return None
    return request_logs.logged_text(answer_text(answer, True)) if stream else request_logs.logged_json(answer)
