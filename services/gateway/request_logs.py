"""Keeping the requests and answers of callers whose policy says log_requests
(appliance/request_logs.py): taken raw as they are answered; the telemetry helper
(services/telemetry) masks and writes them, off the worker's CPU."""

from __future__ import annotations

import time

from services.telemetry.frames import LogRecord


class Exchange:
    """What a logged request sent and got: its body, and its answer (whole, or the streamed pieces)."""

    __slots__ = ("body", "answer", "pieces")

    def __init__(self, body: bytes):
        self.body = body
        self.answer: bytes | None = None
        self.pieces: list[bytes] | None = None


def record(call, latency_ms: float) -> LogRecord:
    """The call has ended (answered or not): what the telemetry helper keeps of it."""
    exchange, principal = call.log, call.principal
    answer = b"".join(exchange.pieces) if exchange.pieces is not None else exchange.answer
    return LogRecord(time.time(), call.request_id, principal.key_id, principal.user_id, principal.team_id,
                     call.model or "", call.endpoint, call.status, latency_ms, exchange.body, answer, call.stream)
