"""The gateway worker's side of its telemetry helper (services/telemetry): the traces and
request logs of the requests that end are queued as records (a microsecond or two
each), and sent every SEND_EVERY_S down a pipe to the helper, which does the rest on
another CPU: making and exporting spans, masking and writing logs.

The helper starts with the first record, starts again if it dies (what it held is lost,
and said in the log), and ends at the end of its stdin: when the worker closes it on the
way out, after the last frame, or when the worker dies."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
from pathlib import Path

import msgspec

from appliance.config import TracingConfig
from services.telemetry import frames

log = logging.getLogger("appliance.gateway")

SEND_EVERY_S = 0.25
MAX_UNSENT_BYTES = 64 * 2**20  # frames the pipe has not taken; beyond, new ones are dropped
PIPE_BYTES = 2**20  # the pipe's buffer (Linux's default most an unprivileged process may ask)
CLOSE_TIMEOUT_S = 30.0


class Telemetry:
    def __init__(self, db_path: Path, tracing: TracingConfig | None):
        self.settings = msgspec.json.encode(frames.Settings(db_path=str(db_path), tracing=tracing)).decode()
        self.spans: list[frames.SpanRecord] = []
        self.logs: list[frames.LogRecord] = []
        self.helper: asyncio.subprocess.Process | None = None
        self.pipe: asyncio.WriteTransport | None = None  # to the helper's stdin
        self.dropped = 0

    def add_span(self, record: frames.SpanRecord) -> None:
        self.spans.append(record)

    def add_log(self, record: frames.LogRecord) -> None:
        self.logs.append(record)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SEND_EVERY_S)
            await self.send()

    async def send(self) -> None:
        try:
            await self._send()
        except Exception:
            log.exception("sending spans and request logs to the telemetry helper failed; they are lost")

    async def _send(self) -> None:
        if not (self.spans or self.logs):
            return
        spans, logs, self.spans, self.logs = self.spans, self.logs, [], []  # lost if no helper starts
        if self.helper is None or self.helper.returncode is not None:
            if self.helper is not None:
                log.warning("the telemetry helper ended (exit status %s); starting another", self.helper.returncode)
            await self._start()
        if self.pipe.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.dropped += len(spans) + len(logs)
            return
        if self.dropped:
            log.warning("%d requests' spans or logs dropped: the telemetry helper fell behind", self.dropped)
            self.dropped = 0
        self.pipe.write(frames.encode(spans, logs))

    async def _start(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # a smaller pipe only means more, smaller writes
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            self.helper = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.telemetry", self.settings, stdin=read_end,
                start_new_session=True)  # out of the worker's process group: its signals are the worker's
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self.pipe, _ = await asyncio.get_running_loop().connect_write_pipe(
            asyncio.Protocol, os.fdopen(write_end, "wb", buffering=0))

    async def close(self) -> None:
        """Send what is queued, and wait for the helper to write it and end."""
        await self.send()
        if self.helper is None or self.helper.returncode is not None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                while self.pipe.get_write_buffer_size():
                    await asyncio.sleep(0.05)
                self.pipe.close()
                await self.helper.wait()
        except TimeoutError:
            log.warning("the telemetry helper did not end within %.0f s; killed", CLOSE_TIMEOUT_S)
            self.helper.kill()
            await self.helper.wait()
