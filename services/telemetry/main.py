"""The telemetry helper's process: `python -m services.telemetry SETTINGS_JSON`, started by
a gateway worker (services/gateway/telemetry.py) with its frames on stdin.

A thread takes the frames as they come; every FLUSH_EVERY_S the spans are exported and the
request logs masked and written. SIGINT and SIGTERM are ignored (__main__.py): the helper
ends when its stdin does (the worker closed it, or died), after writing what it holds."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import msgspec

from services.telemetry import frames
from services.telemetry.otlp import Exporter
from services.telemetry.request_logs import write

log = logging.getLogger("appliance.telemetry")

FLUSH_EVERY_S = 1.0
MAX_PENDING = 20_000  # of each kind; beyond, a collector or a database that keeps failing loses the oldest


class Sink:
    def __init__(self, settings: frames.Settings):
        self.db_path = Path(settings.db_path)
        self.exporter = Exporter(settings.tracing) if settings.tracing is not None else None
        self.lock = threading.Lock()
        self.spans: list[frames.SpanRecord] = []
        self.logs: list[frames.LogRecord] = []
        self.dropped = 0

    def take(self, frame: frames.Frame) -> None:
        with self.lock:
            self.spans += frame.spans if self.exporter is not None else ()
            self.logs += frame.logs
            self._trim()

    def _trim(self) -> None:
        for pending in (self.spans, self.logs):
            if len(pending) > MAX_PENDING:
                self.dropped += len(pending) - MAX_PENDING
                del pending[:-MAX_PENDING]

    def run(self, done: threading.Event) -> None:
        while not done.wait(FLUSH_EVERY_S):
            try:
                self.flush()
            except Exception:
                log.exception("exporting spans or writing request logs failed")

    def flush(self) -> None:
        with self.lock:
            spans, logs, dropped = self.spans, self.logs, self.dropped
            self.spans, self.logs, self.dropped = [], [], 0
        if dropped:
            log.warning("%d requests' spans or logs dropped: more than %d waited for the collector or the database",
                        dropped, MAX_PENDING)
        if spans:
            self.exporter.export(spans)
        if logs:
            try:
                write(self.db_path, logs)
            except Exception:
                log.exception("writing %d request log rows failed; will retry", len(logs))
                with self.lock:
                    self.logs[:0] = logs
                    self._trim()


def main() -> None:
    settings = msgspec.json.decode(sys.argv[1], type=frames.Settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sink, done = Sink(settings), threading.Event()
    flusher = threading.Thread(target=sink.run, args=(done,), name="flush", daemon=True)
    flusher.start()
    for frame in frames.read(sys.stdin.buffer):
        sink.take(frame)
    done.set()
    flusher.join()
    sink.flush()
    if sink.exporter is not None:
        sink.exporter.close()
