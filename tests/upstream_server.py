"""A real OpenAI-compatible upstream for tests of the `remote` engine, run as a subprocess.

Its behaviour is chosen by the path prefix the profile's base_url names:
  /ok/v1      answers at once; echoes the request body it received under "echo"
  /say/v1     answers with the last user message read backwards (so a test can have it write
              a value that the request, masked on its way, did not hold), streamed 3
              characters a chunk (a value arrives split across chunks), with a usage chunk
              when stream_options.include_usage; echoes the request body like /ok
  /slow/v1    waits 30 s before answering (engine timeouts)
  /broken/v1  streams two chunks, then drops the connection (failure mid-stream)
  /endless/v1 streams a chunk every 50 ms until the client goes away
  /stall/v1   streams one chunk, then nothing for 30 s (a stream's silence timeout)
  /ragged/v1  streams OpenAI-style ("usage": null in every chunk, CRLF line ends),
              each event cut in two writes
  /flaky/v1   drops every other request's connection unanswered, as a server does to a
              kept-alive connection it has just closed
  /ctl-NAME/v1 answers like /ok until told otherwise: POST /control/ctl-NAME {"status": 500}
              makes it answer that status (0: answer again; -1: drop the connection unanswered);
              GET /stats counts its chat
              requests under "by_mode"
GET /stats reports how many /slow and /endless requests ended because the client disconnected,
and the W3C traceparent headers of the last chat requests that carried one.
Usage: python upstream_server.py PORT EXPECTED_KEY
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web

STATS = {"disconnects": 0, "requests": 0, "by_mode": {}, "traceparents": []}
FAIL_WITH: dict[str, int] = {}  # ctl- mode -> the status it answers with


def completion(body: dict, content: str = "pong") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
        "echo": body,
    }


def last_user_text(body: dict) -> str:
    return next(message["content"] for message in reversed(body["messages"]) if message["role"] == "user")


def chunk(content: str | None, usage: dict | None = None, finish: str | None = None, *, null_usage=False, end=b"\n\n") -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
    data = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices}
    if usage is not None or null_usage:
        data["usage"] = usage
    return b"data: " + json.dumps(data).encode() + end


def check_key(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization") != f"Bearer {request.app['key']}":
        return web.json_response({"error": {"message": "bad upstream key"}}, status=401)
    return None


async def models(request: web.Request) -> web.Response:
    return check_key(request) or web.json_response({"object": "list", "data": [{"id": "upstream-model", "object": "model"}]})


async def chat(request: web.Request) -> web.StreamResponse:
    if (denied := check_key(request)) is not None:
        return denied
    STATS["requests"] += 1
    if "traceparent" in request.headers:
        STATS["traceparents"] = [*STATS["traceparents"][-19:], request.headers["traceparent"]]
    mode = request.match_info["mode"]
    STATS["by_mode"][mode] = STATS["by_mode"].get(mode, 0) + 1
    body = await request.json()
    if FAIL_WITH.get(mode) == -1:
        request.transport.abort()
        return web.Response()
    if FAIL_WITH.get(mode):
        status = FAIL_WITH[mode]
        return web.json_response({"error": {"message": f"{mode} told to fail with {status}"}}, status=status)
    if mode == "flaky":
        STATS["flaky"] = STATS.get("flaky", 0) + 1
        if STATS["flaky"] % 2 == 0:
            request.transport.abort()
            return web.Response()
    if mode == "slow":
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            STATS["disconnects"] += 1
            raise
    said = last_user_text(body)[::-1] if mode == "say" else "pong"
    if not body.get("stream"):
        if mode == "broken":
            return web.json_response({"error": {"message": "upstream exploded"}}, status=500)
        return web.json_response(completion(body, said))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if mode == "broken":
        await response.write(chunk("po"))
        await response.write(chunk("ng"))
        request.transport.abort()
        return response
    if mode == "stall":
        await response.write(chunk("po"))
        await asyncio.sleep(30)
    if mode == "ragged":
        events = [chunk("po", null_usage=True, end=b"\r\n\r\n"), chunk("ng", finish="stop", null_usage=True, end=b"\r\n\r\n")]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(chunk(None, usage={"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}, end=b"\r\n\r\n"))
        events.append(b"data: [DONE]\r\n\r\n")
        for event in events:
            for part in (event[:15], event[15:]):
                await response.write(part)
                await asyncio.sleep(0.01)
        return response
    if mode == "say":
        pieces = [said[i : i + 3] for i in range(0, len(said), 3)]
        for piece in pieces:
            await response.write(chunk(piece))
        await response.write(chunk("", finish="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 7 + len(pieces)}
            await response.write(chunk(None, usage=usage))
        await response.write(b"data: [DONE]\n\n")
        return response
    if mode == "endless":
        try:
            while True:
                await response.write(chunk("tick "))
                await asyncio.sleep(0.05)
        except (ConnectionResetError, asyncio.CancelledError):
            STATS["disconnects"] += 1
            raise
    await response.write(chunk("po"))
    await response.write(chunk("ng", finish="stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(chunk(None, usage={"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}))
    await response.write(b"data: [DONE]\n\n")
    return response


async def stats(request: web.Request) -> web.Response:
    return web.json_response(STATS)


async def control(request: web.Request) -> web.Response:
    FAIL_WITH[request.match_info["mode"]] = (await request.json())["status"]
    return web.json_response(FAIL_WITH)


def make_app(key: str) -> web.Application:
    app = web.Application()
    app["key"] = key
    app.add_routes([
        web.get("/{mode}/v1/models", models),
        web.post("/{mode}/v1/chat/completions", chat),
        web.get("/stats", stats),
        web.post("/control/{mode}", control),
    ])
    return app


if __name__ == "__main__":
    web.run_app(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), print=None, handler_cancellation=True)
