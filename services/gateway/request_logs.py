"""Keeping the requests and answers of callers whose policy says log_requests
(appliance/request_logs.py): taken as they are answered, masked and written in batches off
the request path, at the gateway's housekeeping tick."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from appliance import request_logs
from appliance.db import open_db, transaction
from services.gateway.shadow import answer_text

log = logging.getLogger("appliance.gateway")

MAX_PENDING = 10_000  # beyond this, a database that keeps failing drops the oldest


class Exchange:
    """What a logged request sent and got: its body, and its answer (whole, or the streamed pieces)."""

    __slots__ = ("body", "answer", "pieces")

    def __init__(self, body: bytes):
        self.body = body
        self.answer: bytes | None = None
        self.pieces: list[bytes] | None = None


class RequestLogWriter:
    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.pending: list[tuple] = []

    def record(self, call, latency_ms: float) -> None:
        """The call has ended (answered or not): kept raw here, masked when written."""
        exchange, principal = call.log, call.principal
        answer = b"".join(exchange.pieces) if exchange.pieces is not None else exchange.answer
        self.pending.append((time.time(), call.request_id, principal.key_id, principal.user_id, principal.team_id,
                             call.model or "", call.endpoint, call.status, latency_ms, exchange.body, answer,
                             call.stream))
        del self.pending[:-MAX_PENDING]

    async def flush(self) -> None:
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        try:
            await asyncio.to_thread(self._write, rows)
        except Exception:
            log.exception("writing %d request log rows failed; will retry", len(rows))
            self.pending[:0] = rows
            del self.pending[:-MAX_PENDING]

    def _write(self, rows: list[tuple]) -> None:
        kept = [(*row[:9], request_logs.logged_json(row[9]), _answer(row[10], row[11])) for row in rows]
        db = open_db(self.db_path, migrate=False)
        try:
            with transaction(db):
                request_logs.insert(db, kept)
        finally:
            db.conn.close()


def _answer(answer: bytes | None, stream: bool) -> str | None:
    if answer is None:
        return None
    return request_logs.logged_text(answer_text(answer, True)) if stream else request_logs.logged_json(answer)
