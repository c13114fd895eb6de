"""The gateway's LAN listener: connection hygiene in front of Granian.

Granian holds a permit for each connection's whole life, stops accepting once its permits
are gone, and never times out a connection that sends nothing: idle connections opened
with no key could stop the gateway. So Granian listens on a Unix socket in the home
(services/gateway/launch.py), and each Granian worker opens this door on the profile's
address (reuse_port: one door per worker, the kernel spreads clients over them). The door

- refuses a connection over gateway.max_connections_per_client (per client address) at
  once with a canned 503; over gateway.max_connections it admits up to
  gateway.reserved_connections more, but only for a first request line that asks for
  /healthz, /readyz or something under /admin, so health checks and admins still get in;
  such a request carries RESERVED_HEADER (added here), and the Litestar bridge answers it
  with `connection: close`, so a reserved connection serves that one request only;
- closes a connection that sends no byte within gateway.header_timeout_s (once bytes come,
  Granian times the headers and idle keep-alive connections with the same setting);
- opens the upstream connection only when the first bytes arrive, then splices bytes both
  ways with asyncio Protocols and flow control; a client that leaves closes its upstream
  connection, which the gateway sees as a disconnect (and cancels the engine's work).
The caps are the profile's divided by the workers, and lowered (with a warning) when the
process may not open enough files for them. With reuse_port the kernel spreads one client's
connections at random over the workers, so with several workers a client may be refused
before it holds the profile's per-client number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from dataclasses import dataclass, replace
from pathlib import Path
from time import monotonic

from appliance.config import GatewayConfig
from appliance.home import gateway_socket_path
from services.gateway.errors import error_body

log = logging.getLogger("appliance.gateway.door")

DOOR_ENV = "APPLIANCE_GATEWAY_LISTEN"  # host:port the door opens, set by services/gateway/launch.py
SWEEP_S = 0.25
RESERVE_FIRST_LINE_S = 2.0  # a reserved slot waits this long at most for its request line
LINGER_S = 2.0  # a refused connection is read (and dropped) this long, so its 503 is not lost to a reset
MAX_LINGERING = 256  # refused connections lingering at once; beyond it they are closed at once
FIRST_LINE_MAX = 8192
REFUSAL_LOG_INTERVAL_S = 60.0  # refusals (per address) and upstream failures are logged this often at most
SPARE_FILES = 512  # engine connections, databases, logs and the rest of the process
HIGH_WATER = 256 * 1024
LISTEN_BACKLOG = 1024
RESERVED_PATHS = ("/healthz", "/readyz")
RESERVED_HEADER = "x-appliance-reserved"  # services/gateway/asgi_bridge.py closes the connection after the answer
FILES_PER_CONNECTION = 4  # client, upstream, Granian's end of the upstream, one engine connection


@dataclass(frozen=True)
class Caps:
    total: int
    per_client: int
    reserve: int
    header_timeout_s: float


def caps_of(config: GatewayConfig) -> Caps:
    """This worker's share of the profile's caps."""
    workers = config.workers
    return Caps(
        total=max(1, config.max_connections // workers),
        per_client=max(1, config.max_connections_per_client // workers),
        reserve=-(-config.reserved_connections // workers),
        header_timeout_s=config.header_timeout_s,
    )


def fit_open_files(caps: Caps) -> Caps:
    """Raise the open-files limit toward its hard limit; lower the caps if even that is too few.
    Each admitted connection costs FILES_PER_CONNECTION descriptors in this process: the
    client's, the door's upstream end, Granian's accepted end, and up to one engine
    connection for its request in flight."""
    wanted = FILES_PER_CONNECTION * (caps.total + caps.reserve) + MAX_LINGERING + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return caps
    room = max(2, (soft - MAX_LINGERING - SPARE_FILES) // FILES_PER_CONNECTION)
    reserve = min(caps.reserve, room // 16)
    fitted = replace(caps, total=max(1, room - reserve), reserve=reserve, per_client=min(caps.per_client, max(1, room - reserve)))
    log.warning("only %d open files allowed (hard limit %s): connection caps lowered from %d (+%d reserved) "
                "to %d (+%d) per worker, at %d descriptors per connection; raise LimitNOFILE / ulimit -n", soft,
                hard, caps.total, caps.reserve, fitted.total, fitted.reserve, FILES_PER_CONNECTION)
    return fitted


def _refusal(message: str, code: str) -> bytes:
    body = error_body(message, "service_unavailable", code=code)
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "retry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def _wants_reserve(first_line: bytes) -> bool:
    """A health check or an admin request: GET /healthz, GET /readyz, or any method under /admin."""
    parts = first_line.split(b" ")
    if len(parts) != 3:
        return False
    method, target = parts[0], parts[1].split(b"?", 1)[0].decode("latin-1")
    if target == "/admin" or target.startswith("/admin/"):
        return True
    return method in (b"GET", b"HEAD") and target in RESERVED_PATHS


# Connection states
WAITING, RESERVED, OPEN, REFUSED, CLOSED = "waiting", "reserved", "open", "refused", "closed"


class ClientSide(asyncio.Protocol):
    """One client connection, spliced to its own upstream connection once it sends bytes."""

    __slots__ = ("door", "transport", "address", "state", "deadline", "reserved", "pending", "upstream", "eof",
                 "held_by_pending", "held_by_upstream")

    def __init__(self, door: Door):
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.state = WAITING
        self.deadline = 0.0
        self.reserved = False
        self.pending: list[bytes] | None = None  # bytes received before the upstream is open
        self.upstream: asyncio.Transport | None = None
        self.eof = False  # the client half-closed before the upstream was open
        # Reading from the client is paused while either holds; resumed only when neither does.
        self.held_by_pending = False  # too many bytes wait for the upstream to open
        self.held_by_upstream = False  # the upstream's write buffer is full

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if peer else ""
        self.door.admit(self)

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        elif self.state != REFUSED:  # a refused client's bytes are dropped until it leaves or lingering ends
            if self.pending is None:
                self.pending = []
            self._hold(data)
            if self.state == RESERVED:
                self._check_reserve()
            elif self.state == WAITING:
                self._open_upstream()

    def _hold(self, data: bytes) -> None:
        self.pending.append(data)
        if sum(map(len, self.pending)) > HIGH_WATER:
            self.held_by_pending = True
            self.update_reading()

    def update_reading(self) -> None:
        """Read from the client exactly when nothing holds it back."""
        if self.transport.is_closing():
            return
        if self.held_by_pending or self.held_by_upstream:
            if self.transport.is_reading():
                self.transport.pause_reading()
        elif not self.transport.is_reading():
            self.transport.resume_reading()

    def _check_reserve(self) -> None:
        head = b"".join(self.pending)
        end = head.find(b"\r\n")
        if end < 0 and len(head) < FIRST_LINE_MAX:
            return  # the rest of the line is still to come
        if end >= 0 and _wants_reserve(head[:end]):
            self.pending = [head[:end + 2], RESERVED_HEADER.encode() + b": 1\r\n", head[end + 2:]]
            self._open_upstream()
        else:
            self.door.refuse(self, self.door.over_total)

    def _open_upstream(self) -> None:
        self.door.waiting.discard(self)
        self.state = OPEN
        loop = asyncio.get_running_loop()
        opening = asyncio.ensure_future(loop.create_unix_connection(lambda: UpstreamSide(self), self.door.upstream_path))
        opening.add_done_callback(self._upstream_failed)

    def _upstream_failed(self, opening: asyncio.Future) -> None:
        if opening.cancelled() or opening.exception() is not None:
            if not self.transport.is_closing():
                self.door.log_upstream_failure(opening.exception() if not opening.cancelled() else "cancelled")
                self.transport.write(self.door.not_ready)
                self.transport.close()

    def upstream_opened(self, upstream: asyncio.Transport) -> None:
        if self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        upstream.write(b"".join(self.pending))  # may pause this side (held_by_upstream)
        self.pending = None
        if self.eof:
            upstream.write_eof()
        else:
            self.held_by_pending = False
            self.update_reading()

    def eof_received(self) -> bool:
        if self.upstream is not None:
            self.upstream.write_eof()
            return True  # half-closed: the answer may still come
        if self.state == OPEN:  # the upstream is opening: pass the end on once it is open
            self.eof = True
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.release(self)
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()


class UpstreamSide(asyncio.Protocol):
    """The door's connection to Granian for one client."""

    __slots__ = ("client", "transport")

    def __init__(self, client: ClientSide):
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.client.upstream_opened(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        return False  # Granian is done with the connection: close it, and the client's after its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()  # sends what is buffered first

    def pause_writing(self) -> None:
        self.client.held_by_upstream = True
        self.client.update_reading()

    def resume_writing(self) -> None:
        self.client.held_by_upstream = False
        self.client.update_reading()


class Door:
    def __init__(self, host: str, port: int, upstream_path: Path, caps: Caps):
        self.host, self.port, self.upstream_path, self.caps = host, port, str(upstream_path), caps
        self.per_client: dict[str, int] = {}
        self.ordinary = 0
        self.reserved = 0
        self.lingering = 0
        self.waiting: set[ClientSide] = set()  # timed by the sweep: no byte yet, or refused and lingering
        self.clients: set[ClientSide] = set()
        self.logged: dict[str, float] = {}  # address -> when its last refusal was logged
        self.upstream_failure_logged = -REFUSAL_LOG_INTERVAL_S
        self.upstream_failures = 0  # since the last log line
        self.over_client = _refusal(
            f"Too many connections from your address: the gateway allows {caps.per_client} per client "
            "(gateway.max_connections_per_client). Close idle connections and retry.", "too_many_connections")
        self.over_total = _refusal(
            f"The gateway is at its connection limit of {caps.total} (gateway.max_connections). Retry shortly.",
            "too_many_connections")
        self.not_ready = _refusal("The gateway is not ready. Retry shortly.", "gateway_not_ready")
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ClientSide(self), self.host, self.port, reuse_port=True,
                                                backlog=LISTEN_BACKLOG)
        self._sweeper = asyncio.create_task(self._sweep())

    def close(self) -> None:
        """Stop accepting and close every connection (the gateway is stopping), refused ones
        still lingering included."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for client in list(self.clients | self.waiting):
            client.transport.close()

    def admit(self, client: ClientSide) -> None:
        count = self.per_client.get(client.address, 0)
        if count >= self.caps.per_client:
            self.refuse(client, self.over_client, counted=False)
            return
        if self.ordinary < self.caps.total:
            self.ordinary += 1
            client.deadline = monotonic() + self.caps.header_timeout_s
        elif self.reserved < self.caps.reserve:
            self.reserved += 1
            client.reserved, client.state = True, RESERVED
            client.deadline = monotonic() + min(RESERVE_FIRST_LINE_S, self.caps.header_timeout_s)
        else:
            self.refuse(client, self.over_total, counted=False)
            return
        self.per_client[client.address] = count + 1
        self.clients.add(client)
        self.waiting.add(client)

    def refuse(self, client: ClientSide, answer: bytes, counted: bool = True) -> None:
        """Answer 503 and close; the client's bytes are read and dropped meanwhile, since closing
        with unread bytes would reset the connection and lose the answer."""
        if counted:
            self.release(client)
        self._log_refusal(client.address, answer)
        transport = client.transport
        transport.write(answer)
        if self.lingering >= MAX_LINGERING:
            client.state = CLOSED
            transport.close()
            return
        self.lingering += 1
        client.state, client.pending = REFUSED, None
        client.deadline = monotonic() + LINGER_S
        transport.write_eof()
        client.held_by_pending = False
        client.update_reading()
        self.waiting.add(client)

    def release(self, client: ClientSide) -> None:
        """Once per client: its slot and its count are free again."""
        self.waiting.discard(client)
        if client.state == REFUSED:
            self.lingering -= 1
            client.state = CLOSED
            return
        if client not in self.clients:
            return
        self.clients.discard(client)
        if client.reserved:
            self.reserved -= 1
        else:
            self.ordinary -= 1
        count = self.per_client[client.address] - 1
        if count:
            self.per_client[client.address] = count
        else:
            del self.per_client[client.address]

    def _log_refusal(self, address: str, answer: bytes) -> None:
        now = monotonic()
        if now - self.logged.get(address, -REFUSAL_LOG_INTERVAL_S) < REFUSAL_LOG_INTERVAL_S:
            return
        self.logged[address] = now
        why = "per-client" if answer is self.over_client else "total"
        log.warning("refusing connections from %s: over the %s connection cap (%d of %d ordinary, %d of %d reserved "
                    "in use); logged once a minute per address", address, why, self.ordinary, self.caps.total,
                    self.reserved, self.caps.reserve)

    def log_upstream_failure(self, reason: object) -> None:
        """Once a minute at most: while Granian stops, every connection fails the same way."""
        self.upstream_failures += 1
        now = monotonic()
        if now - self.upstream_failure_logged < REFUSAL_LOG_INTERVAL_S:
            return
        log.error("the gateway's socket %s did not answer (%d connections answered 503 since the last report): %s; "
                  "logged once a minute", self.upstream_path, self.upstream_failures, reason)
        self.upstream_failure_logged, self.upstream_failures = now, 0

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = monotonic()
            for client in [c for c in self.waiting if now >= c.deadline]:
                self.waiting.discard(client)
                client.transport.close()  # sent nothing in time, or lingered long enough after its 503
            if len(self.logged) > 1024:
                self.logged = {a: t for a, t in self.logged.items() if now - t < REFUSAL_LOG_INTERVAL_S}


async def open_door(config: GatewayConfig, home: Path) -> Door | None:
    """The door on the address services/gateway/launch.py passed on; None where the gateway
    runs without one (in-process, in tests of the app alone)."""
    listen = os.environ.get(DOOR_ENV)
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    door = Door(host.strip("[]"), int(port), gateway_socket_path(home), fit_open_files(caps_of(config)))
    await door.start()
    return door
