"""What a gateway worker sends its telemetry helper: frames on the helper's stdin, each a
4-byte big-endian length and a msgpack Frame, the requests that ended since the last one."""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

import msgspec

from appliance.config import TracingConfig

HEADER = struct.Struct(">I")


class Settings(msgspec.Struct, kw_only=True):
    """The helper's one argument, as JSON: where request logs go, and where spans go (None: no tracing)."""

    db_path: str
    tracing: TracingConfig | None = None


class SpanRecord(msgspec.Struct, array_like=True, gc=False):
    """A traced request's readings (services/gateway/tracing.py); times in ns since the epoch, None where a stage was not reached."""

    trace_id: str
    span_id: str
    parent_id: str
    endpoint: str
    start: int
    end: int
    authenticate: int | None
    route: int | None
    policy: int | None
    engine_call: int | None  # the first attempt on an engine began
    engine: int | None  # its answer started
    engine_id: str | None
    url: str
    status: int
    request_id: str
    model: str | None
    route_name: str | None
    input_tokens: int | None
    output_tokens: int | None
    error_type: str | None


class LogRecord(msgspec.Struct, array_like=True, gc=False):
    """A logged request (services/gateway/request_logs.py), raw: the helper masks it."""

    ts: float
    request_id: str
    key_id: str | None
    user_id: str | None
    team_id: str | None
    model: str
    endpoint: str
    status: int
    latency_ms: float
    request: bytes
    answer: bytes | None
    stream: bool


class Frame(msgspec.Struct, array_like=True):
    spans: list[SpanRecord]
    logs: list[LogRecord]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Frame).decode


def encode(spans: list[SpanRecord], logs: list[LogRecord]) -> bytes:
    """A frame, header included."""
    payload = _encode((spans, logs))
    return HEADER.pack(len(payload)) + payload


def read(stream: BinaryIO) -> Iterator[Frame]:
    """The frames on `stream`, until it ends (a frame cut short by the end is dropped)."""
    while len(header := stream.read(HEADER.size)) == HEADER.size:
        (size,) = HEADER.unpack(header)
        payload = stream.read(size)
        if len(payload) < size:
            return
        yield _decode(payload)
