"""An OpenAI-compatible upstream that fails on demand, for bench/chaos.py.

It answers POST /v1/chat/completions (JSON, or an SSE stream of a few chunks, with a usage
chunk when stream_options.include_usage) and GET /v1/models, with faults set at start by
flags and changed live by POST /faults (a JSON object with any of the fields; the answer
is the faults now in force):
  delay_s, jitter_s  added latency before answering: delay_s, plus or minus up to jitter_s
  error_rate         share of chat requests answered 500
  drop_rate          share of chat requests whose connection is dropped before any answer
  cut_rate           share of streams whose connection is dropped after their first chunk
  down               true: PORT stops listening (connecting is refused) and its open
                     connections are dropped; false: it listens on PORT again
Only chat requests get faults: GET /v1/models (a health check) answers unless down. Each
chat request draws from one random.Random(--seed), so a run's sequence of draws is the same
every time. GET /stats counts chat requests by what they got. /faults and /stats are served
on --control-port too, which stays up when PORT is down.
Usage: python bench/fault_upstream.py PORT --control-port CPORT [--seed 0] [--delay-s S]
       [--jitter-s S] [--error-rate R] [--drop-rate R] [--cut-rate R] [--down]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random

from aiohttp import web

HOST = "127.0.0.1"
FAULTS = {"delay_s": float, "jitter_s": float, "error_rate": float, "drop_rate": float, "cut_rate": float, "down": bool}
WORDS = ("The ", "capital ", "of ", "France ", "is ", "Paris", ".")


def chunk(model: str, content: str | None, usage: dict | None = None) -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    data = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": choices}
    if usage:
        data["usage"] = usage
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class FaultUpstream:
    def __init__(self, port: int, faults: dict, seed: int):
        self.port, self.faults = port, faults
        self.rng = random.Random(seed)
        self.stats: collections.Counter = collections.Counter()
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        f = self.faults
        jitter, drop, error, cut = (self.rng.random() for _ in range(4))  # four draws each, whatever the faults
        delay = max(0.0, f["delay_s"] + (2 * jitter - 1) * f["jitter_s"])
        if delay:
            await asyncio.sleep(delay)
        self.stats["requests"] += 1
        if drop < f["drop_rate"]:
            self.stats["dropped"] += 1
            request.transport.abort()
            return web.Response()
        if error < f["error_rate"]:
            self.stats["errors"] += 1
            return web.json_response({"error": {"message": "fault_upstream: injected error"}}, status=500)
        model = body.get("model", "fault")
        if not body.get("stream"):
            self.stats["ok"] += 1
            return web.json_response({
                "id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk(model, WORDS[0]))
        if cut < f["cut_rate"]:
            self.stats["cut"] += 1
            request.transport.abort()
            return response
        for word in WORDS[1:]:
            await response.write(chunk(model, word))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(chunk(model, None, {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}))
        await response.write(b"data: [DONE]\n\n")
        self.stats["ok"] += 1
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fault", "object": "model"}]})

    async def set_faults(self, request: web.Request) -> web.Response:
        changes = await request.json()
        for name, value in changes.items():
            if name not in FAULTS:
                raise web.HTTPBadRequest(text=f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
            self.faults[name] = FAULTS[name](value)
        await self.listen(not self.faults["down"])
        return web.json_response(self.faults)

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def listen(self, up: bool) -> None:
        """Listen on the port, or stop: close the listening socket and drop its open connections."""
        if up and self.site is None:
            self.site = web.TCPSite(self.runner, HOST, self.port, reuse_address=True, backlog=1024)
            await self.site.start()
        elif not up and self.site is not None:
            await self.site.stop()
            self.site = None
            for handler in self.runner.server.connections:
                if handler.transport is not None and handler.transport.get_extra_info("sockname")[1] == self.port:
                    handler.transport.abort()

    async def serve(self, control_port: int) -> None:
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", self.chat), web.get("/v1/models", self.models),
                        web.post("/faults", self.set_faults), web.get("/stats", self.get_stats)])
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, control_port).start()
        await self.listen(not self.faults["down"])
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    for name, kind in FAULTS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=float, default=0.0)
    args = parser.parse_args()
    faults = {name: getattr(args, name) for name in FAULTS}
    asyncio.run(FaultUpstream(args.port, faults, args.seed).serve(args.control_port))


if __name__ == "__main__":
    main()
