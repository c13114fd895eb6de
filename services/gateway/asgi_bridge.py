"""Serving an ASGI app (the Litestar part of the gateway) from Granian's RSGI interface.

The gateway runs on RSGI because its hot path is cheaper there than on ASGI (see
docs/benchmarks.md); the admin, health and model-list routes stay a Litestar app, which
speaks ASGI, and reach it through this bridge. Only HTTP is bridged (the gateway runs
with --no-ws); lifespan is the gateway's own (__rsgi_init__ / __rsgi_del__).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import quote

from granian.rsgi import ProtocolClosed
from litestar.types import ASGIApp, Message

from services.gateway.body_reads import drain, timed
from services.gateway.door import RESERVED_HEADER

BODY_END = {"type": "http.request", "body": b"", "more_body": False}
DISCONNECT = {"type": "http.disconnect"}


def _address(value: str) -> tuple[str, int] | None:
    host, _, port = value.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else None


class AsgiBridge:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes  # what an early answer drains of an unread body

    async def __call__(self, scope, proto) -> None:
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in scope.headers.items()]
        asgi_scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": scope.http_version,
            "method": scope.method,
            "scheme": scope.scheme,
            "path": scope.path,  # RSGI gives it percent-decoded, as ASGI wants it
            "raw_path": quote(scope.path).encode(),
            "query_string": scope.query_string.encode("latin-1"),
            "root_path": "",
            "headers": headers,
            "client": _address(scope.client),
            "server": _address(scope.server),
            "state": {},
        }
        body = proto.__aiter__()
        body_done = False
        status, response_headers, stream = 500, [], None
        answered = asyncio.Event()  # the whole response is sent: the exchange is over, as a disconnect

        async def receive() -> Message:
            # A body cut short by the client just ends early here; readers that care
            # compare it with Content-Length (services/gateway/admin.py does). Each chunk
            # must come within gateway.body_timeout_s of asking for it, or RequestTimeout.
            nonlocal body_done
            if not body_done:
                try:
                    return {"type": "http.request", "body": await timed(body.__anext__()), "more_body": True}
                except StopAsyncIteration:
                    body_done = True
                    return BODY_END
            if not answered.is_set():  # Litestar's streams wait for this after their last chunk
                waits = [asyncio.ensure_future(proto.client_disconnect()), asyncio.ensure_future(answered.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
            return DISCONNECT

        async def send(message: Message) -> None:
            nonlocal status, response_headers, stream, body_done
            if message["type"] == "http.response.start":
                if not body_done and (scope.headers.get("content-length") or scope.headers.get("transfer-encoding")):
                    body_done = True  # answered before the body was read (a 401, a 404): drop the rest
                    await drain(body, self.max_body_bytes)
                status = message["status"]
                response_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in message.get("headers", ())]
                if scope.headers.get(RESERVED_HEADER) is not None:  # admitted to the door's reserve: one request only
                    response_headers.append(("connection", "close"))
                return
            if message["type"] != "http.response.body":
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            if not more:
                answered.set()
            if stream is None:
                if not more:
                    proto.response_bytes(status, response_headers, chunk)
                    return
                stream = proto.response_stream(status, response_headers)
            if chunk:
                with contextlib.suppress(ProtocolClosed):  # the client left; it also sees http.disconnect
                    await stream.send_bytes(chunk)

        await self.app(asgi_scope, receive, send)
