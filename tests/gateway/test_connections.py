"""Connection hygiene on the gateway's LAN listener (services/gateway/door.py), against real
stacks, with slowloris-style clients: idle connections over the caps, connections that
send nothing, trickled bodies. Loopback is the whole 127/8, so each test picks its own
client addresses (127.0.0.N) to keep the per-client and total caps apart. The door's own
bookkeeping (flow control, shutdown, failure logs) is tested in process, against real
sockets and a Unix-socket peer in Granian's place."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from services.gateway.door import HIGH_WATER, Caps, Door
from tests.conftest import DEFAULT_MODEL, QUESTION, free_port, start_stack, write_profile

PER_CLIENT, TOTAL, RESERVE = 20, 40, 8
SHORT_S = 2  # header and body timeouts of the `strict` stack
SLACK_S = 20  # for a loaded machine: a close must come, not come fast
HOLD = "held connections"


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """Low connection caps; the timeouts stay long so held connections last the test."""
    tmp = tmp_path_factory.mktemp("door-caps")
    profile = write_profile(tmp / "profile.yaml", None, max_connections_per_client=PER_CLIENT,
                            max_connections=TOTAL, reserved_connections=RESERVE)
    running = start_stack(tmp, profile)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("door-timeouts")
    profile = write_profile(tmp / "profile.yaml", None, header_timeout_s=SHORT_S, body_timeout_s=SHORT_S)
    running = start_stack(tmp, profile)
    yield running
    running.stop()


def connect(stack, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(SLACK_S + SHORT_S)  # a read that hangs past this fails the test
    sock.connect(("127.0.0.1", stack.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, headers: dict | None = None, body: bytes = b"", length: int | None = None) -> bytes:
    fields = {"Host": "gateway", **(headers or {})}
    if body or length is not None:
        fields["Content-Length"] = str(len(body) if length is None else length)
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode() + body


def exchange(stack, source: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection that the client closes after the answer."""
    with connect(stack, source) as sock:
        sock.sendall(raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        return parse(read_until_closed(sock))


def client_from(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=SLACK_S)


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def settle(stack) -> None:
    """Closed connections are released before this round trip ends: the door saw their
    ends before the new connection's first bytes."""
    with client_from("127.0.0.99") as client:
        assert client.get(stack.root + "/healthz").status_code == 200


def test_idle_connections_over_the_per_client_cap_get_a_503_at_once(capped):
    held = [connect(capped, "127.0.0.2") for _ in range(PER_CLIENT)]
    try:
        with connect(capped, "127.0.0.2") as extra:
            started = time.monotonic()
            status, headers, body = parse(read_until_closed(extra))  # answered without a byte sent
            assert time.monotonic() - started < SLACK_S
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        error = error_of(body)
        assert error["code"] == "too_many_connections" and "gateway.max_connections_per_client" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        # Other clients are not affected, and the held connections still serve.
        with client_from("127.0.0.3") as client:
            assert client.get(capped.root + "/healthz").status_code == 200
            listed = client.get(capped.base_url + "/models", headers={"Authorization": f"Bearer {capped.admin_key}"})
            assert listed.status_code == 200 and listed.json()["data"][0]["id"] == DEFAULT_MODEL
        held[0].sendall(request("GET", "/healthz"))
        answer = held[0].recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" not in answer.lower()  # kept alive
    finally:
        for sock in held:
            sock.close()
    settle(capped)


def test_a_refused_request_still_reads_its_503(capped):
    """A client that sends its request at once is not reset: the 503 reaches it."""
    held = [connect(capped, "127.0.0.4") for _ in range(PER_CLIENT)]
    try:
        status, _, body = exchange(capped, "127.0.0.4", request("POST", "/v1/chat/completions", body=b"{}" * 20000))
        assert status == 503 and error_of(body)["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    settle(capped)


def test_over_the_total_cap_the_reserve_admits_health_checks_and_admins(capped):
    held = [connect(capped, f"127.0.0.{5 + i // PER_CLIENT}") for i in range(TOTAL)]  # two clients fill it
    try:
        with client_from("127.0.0.7") as client:
            assert client.get(capped.root + "/healthz").status_code == 200
            assert client.get(capped.root + "/readyz").status_code == 200
            keys = client.get(capped.root + "/admin/keys", headers={"Authorization": f"Bearer {capped.admin_key}"})
            assert keys.status_code == 200
        status, _, body = exchange(capped, "127.0.0.7", request("GET", "/v1/models"))
        assert status == 503 and "gateway.max_connections" in error_of(body)["message"]
        with connect(capped, "127.0.0.7") as sock:  # a request line in pieces is read whole
            sock.sendall(b"GET /hea")
            time.sleep(0.2)
            sock.sendall(request("GET", "/healthz", {"Connection": "close"})[len(b"GET /hea"):])
            assert parse(read_until_closed(sock))[0] == 200
    finally:
        for sock in held:
            sock.close()
    settle(capped)


def test_a_reserved_connection_serves_one_request_and_is_closed(capped):
    """The reserve cannot carry ordinary traffic after its first request: a second request,
    pipelined or sent after the answer, gets nothing."""
    held = [connect(capped, f"127.0.0.{10 + i // PER_CLIENT}") for i in range(TOTAL)]
    chat = request("POST", "/v1/chat/completions", {"Authorization": f"Bearer {capped.admin_key}"},
                   json.dumps({"model": DEFAULT_MODEL, "messages": [QUESTION], "max_tokens": 1}).encode())
    try:
        with connect(capped, "127.0.0.12") as sock:  # pipelined
            sock.sendall(request("GET", "/healthz") + chat)
            raw = read_until_closed(sock)
        status, headers, body = parse(raw)
        assert status == 200 and headers["connection"] == "close" and raw.count(b"HTTP/1.1 ") == 1
        with connect(capped, "127.0.0.12") as sock:  # after the answer
            sock.sendall(request("GET", "/readyz"))
            status, headers, _ = parse(read_until_answered(sock))
            assert status == 200 and headers["connection"] == "close"
            try:
                sock.sendall(chat)
                assert read_until_closed(sock) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed before the second request was even written
    finally:
        for sock in held:
            sock.close()
    settle(capped)


def read_until_answered(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, leaving the connection open."""
    raw = b""
    while b"\r\n\r\n" not in raw or len(parse(raw)[2]) < int(parse(raw)[1]["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed before the answer"
        raw += chunk
    return raw


def test_a_streamed_answer_passes_through_the_door(capped):
    stream = capped.client().chat.completions.create(model=DEFAULT_MODEL, messages=[QUESTION], max_tokens=8,
                                                     temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip()


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(strict):
    with connect(strict, "127.0.0.2") as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # closed without an answer
        assert SHORT_S - 0.1 <= time.monotonic() - started < SHORT_S + SLACK_S


def test_an_idle_keep_alive_connection_is_closed(strict):
    with connect(strict, "127.0.0.2") as sock:
        sock.sendall(request("GET", "/healthz"))
        answered = sock.recv(65536)
        started = time.monotonic()
        assert answered.startswith(b"HTTP/1.1 200")
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started < SHORT_S + SLACK_S


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/keys", "/admin/models/trickled/upload?filename=m.gguf"])
def test_a_trickled_body_gets_408(strict, path):
    with connect(strict, "127.0.0.3") as sock:
        sock.sendall(request("POST", path, {"Authorization": f"Bearer {strict.admin_key}"}, b'{"model": ', length=10_000))
        started = time.monotonic()
        status, _, body = parse(read_until_closed(sock))
        assert SHORT_S - 0.1 <= time.monotonic() - started < SHORT_S + SLACK_S
    assert status == 408
    error = error_of(body)
    assert error["code"] == "request_timeout" and "gateway.body_timeout_s" in error["message"]
    if path.startswith("/v1/"):  # metered like any other error
        deadline = time.monotonic() + SLACK_S
        while not usage_408(strict) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert usage_408(strict)


def usage_408(stack) -> int:
    with sqlite3.connect(stack.home / "state.db") as conn:
        return conn.execute("SELECT count(*) FROM usage WHERE status = 408").fetchone()[0]


def test_a_slow_but_steady_upload_is_not_timed_out(strict):
    """The body timeout is per chunk: an upload longer than it, never silent that long, completes."""
    pieces = [b"not a model file " * 8] * 8
    with connect(strict, "127.0.0.4") as sock:
        sock.sendall(request("POST", "/admin/models/steady/upload?filename=m.gguf",
                             {"Authorization": f"Bearer {strict.admin_key}"}, length=sum(map(len, pieces))))
        started = time.monotonic()
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(SHORT_S / 4)
        assert time.monotonic() - started > SHORT_S  # the whole body took longer than the timeout
        status, _, body = parse(read_until_closed(sock))
    assert status == 400 and error_of(body)["code"] == "invalid_model"  # read whole, then refused as a model


class Deaf(asyncio.Protocol):
    """Granian's place, never reading: the door's writes to it back up."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.pause_reading()


async def door_before(upstream: Path, caps: Caps) -> tuple[Door, int]:
    port = free_port()
    door = Door("127.0.0.1", port, upstream, caps)
    await door.start()
    return door, port


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + SLACK_S
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_a_full_upstream_keeps_the_client_paused_when_the_upstream_opens():
    """Bytes held until the upstream opens fill its buffer past asyncio's high-water mark (but
    not the door's HIGH_WATER): the client stays paused until the upstream drains."""
    async def main():
        loop = asyncio.get_running_loop()
        path = Path(tempfile.mkdtemp()) / "granian.sock"
        peers: list[Deaf] = []
        server = await loop.create_unix_server(lambda: peers.append(Deaf()) or peers[-1], str(path))
        probe, _ = await loop.create_unix_connection(asyncio.Protocol, str(path))
        probe.write(b"p" * (1 << 20))
        absorbed = (1 << 20) - probe.get_write_buffer_size()  # what the kernel holds for a peer that never reads
        probe.abort()
        door, port = await door_before(path, Caps(total=4, per_client=4, reserve=0, header_timeout_s=30))
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: door.clients, "the door admitted the client")
        client = next(iter(door.clients))
        held = absorbed + 128 * 1024
        assert held > HIGH_WATER  # so the door pauses the client until the upstream opens
        client.data_received(b"x" * held)  # as if read in pieces before the upstream opened
        await until(lambda: client.upstream is not None, "the upstream opened")
        backed_up = client.upstream.get_write_buffer_size()
        assert 64 * 1024 < backed_up <= HIGH_WATER, backed_up  # over asyncio's pause mark only
        assert not client.transport.is_reading()
        peers[-1].transport.resume_reading()  # Granian reads again: the client is read again
        await until(lambda: client.transport.is_reading(), "the client was resumed")
        writer.close()
        door.close()
        server.close()

    asyncio.run(main())


def test_a_stopped_upstream_is_logged_once_and_answered_503(caplog):
    async def main():
        door, port = await door_before(Path(tempfile.mkdtemp()) / "gone.sock",
                                       Caps(total=8, per_client=8, reserve=0, header_timeout_s=30))
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request("GET", "/healthz"))
            status, _, body = parse(await reader.read())
            assert status == 503 and error_of(body)["code"] == "gateway_not_ready"
            writer.close()
        door.close()

    with caplog.at_level(logging.ERROR, logger="appliance.gateway.door"):
        asyncio.run(main())
    assert len([r for r in caplog.records if "did not answer" in r.getMessage()]) == 1


def test_closing_the_door_closes_refused_connections_still_lingering():
    async def main():
        door, port = await door_before(Path(tempfile.mkdtemp()) / "unused.sock",
                                       Caps(total=8, per_client=1, reserve=0, header_timeout_s=30))
        _, admitted = await asyncio.open_connection("127.0.0.1", port)
        refused, lingering = await asyncio.open_connection("127.0.0.1", port)
        assert parse(await refused.read())[0] == 503  # the door half-closed it; it lingers, open
        assert door.lingering == 1
        door.close()
        await until(lambda: door.lingering == 0 and not door.clients, "every connection was closed")
        admitted.close()
        lingering.close()

    asyncio.run(main())
