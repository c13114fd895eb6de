"""Bare pass-throughs with no features, the references the gateway is compared with: a
Litestar-on-Granian app (ASGI; also the harness for choosing the upstream HTTP client) and
a raw RSGI app, the interface the gateway is served on.

It forwards each POST body to $PASSTHROUGH_UPSTREAM (an OpenAI API root) and relays
the answer, streaming or not, with no auth, metrics, metering or validation. The
client is chosen by $PASSTHROUGH_CLIENT: aiohttp (the gateway's), httpx, aiosonic or
pyreqwest. Served by: granian --interface asgi bench.passthrough:app
               or: granian --interface rsgi bench.passthrough:rsgi_app (aiohttp only)
"""

from __future__ import annotations

import os

from litestar import Litestar, asgi
from litestar.types import Receive, Scope, Send

UPSTREAM = os.environ.get("PASSTHROUGH_UPSTREAM", "http://127.0.0.1:19000/v1")
CLIENT = os.environ.get("PASSTHROUGH_CLIENT", "aiohttp")
HEADERS = {"Content-Type": "application/json"}
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


class AiohttpClient:
    def __init__(self):
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def forward(self, url: str, body: bytes, send: Send) -> None:
        async with self.session.post(url, data=body, headers=HEADERS) as response:
            streaming = response.content_type == "text/event-stream"
            await send({"type": "http.response.start", "status": response.status, "headers": SSE if streaming else JSON})
            if not streaming:
                await send({"type": "http.response.body", "body": await response.read()})
                return
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


class HttpxClient:
    def __init__(self):
        import httpx

        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    async def forward(self, url: str, body: bytes, send: Send) -> None:
        async with self.client.stream("POST", url, content=body, headers=HEADERS) as response:
            streaming = response.headers.get("content-type", "").startswith("text/event-stream")
            await send({"type": "http.response.start", "status": response.status_code, "headers": SSE if streaming else JSON})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


class AiosonicClient:
    def __init__(self):
        import aiosonic

        self.client = aiosonic.HTTPClient()

    async def forward(self, url: str, body: bytes, send: Send) -> None:
        response = await self.client.post(url, data=body, headers=HEADERS)
        streaming = response.headers.get("content-type", "").startswith("text/event-stream")
        await send({"type": "http.response.start", "status": response.status_code, "headers": SSE if streaming else JSON})
        if not streaming:
            await send({"type": "http.response.body", "body": await response.content()})
            return
        async for chunk in response.read_chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


class PyreqwestClient:
    def __init__(self):
        from pyreqwest.client import ClientBuilder

        self.client = ClientBuilder().build()

    async def forward(self, url: str, body: bytes, send: Send) -> None:
        async with self.client.post(url).headers(HEADERS).body_bytes(body).build_streamed() as response:
            streaming = (response.get_header("content-type") or "").startswith("text/event-stream")
            await send({"type": "http.response.start", "status": response.status, "headers": SSE if streaming else JSON})
            reader = response.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b""})


CLIENTS = {"aiohttp": AiohttpClient, "httpx": HttpxClient, "aiosonic": AiosonicClient, "pyreqwest": PyreqwestClient}
state: dict = {}


async def start(app: Litestar) -> None:
    state["client"] = CLIENTS[CLIENT]()


@asgi("/v1", is_mount=True, copy_scope=False)
async def forward(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await state["client"].forward(UPSTREAM + scope["path"], body, send)


app = Litestar([forward], on_startup=[start], openapi_config=None)


class RsgiPassthrough:
    """The same forwarding on Granian's RSGI interface, with aiohttp."""

    def __rsgi_init__(self, loop) -> None:
        self.client = loop.run_until_complete(_make(AiohttpClient))

    async def __rsgi__(self, scope, proto) -> None:
        body = await proto()
        async with self.client.session.post(UPSTREAM + scope.path[3:], data=body, headers=HEADERS) as response:
            if response.content_type != "text/event-stream":
                proto.response_bytes(response.status, RSGI_JSON, await response.read())
                return
            transport = proto.response_stream(response.status, RSGI_SSE)
            async for chunk in response.content.iter_any():
                await transport.send_bytes(chunk)


async def _make(client_class):
    return client_class()  # aiohttp wants its session made on the running loop


RSGI_JSON = [("content-type", "application/json")]
RSGI_SSE = [("content-type", "text/event-stream")]
rsgi_app = RsgiPassthrough()
