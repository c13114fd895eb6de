"""A fast fixed-response OpenAI-compatible upstream, to isolate the gateway's own cost.

A raw asyncio protocol on uvloop with keep-alive: it answers every POST at once with
the same chat completion, as JSON or (when the body asks for `"stream": true`) as a
short SSE stream with a usage chunk; GET /v1/models lists one model.
Usage: python bench/fixed_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop

MODEL = "fixed"
_COMPLETION = json.dumps({
    "id": "chatcmpl-fixed", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
}).encode()


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunk(content: str | None, usage: dict | None = None) -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    body = {"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": choices}
    if usage:
        body["usage"] = usage
    return _event(body)


_EVENTS = [_chunk(word) for word in ("The ", "capital ", "of ", "France ", "is ", "Paris", ".")]
_EVENTS += [_chunk(None, {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}), b"data: [DONE]\n\n"]
_STREAM = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in _EVENTS) + b"0\r\n\r\n"


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, content_type, len(body), body)


COMPLETION = _response(b"200 OK", b"application/json", _COMPLETION)
STREAM = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + _STREAM
MODELS = _response(b"200 OK", b"application/json", json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())
NOT_FOUND = _response(b"404 Not Found", b"application/json", b'{"error": {"message": "not found"}}')


class FixedHTTP(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            if head.startswith(b"post"):
                streaming = b'"stream":true' in body.replace(b" ", b"")
                self.transport.write(STREAM if streaming else COMPLETION)
            elif head.startswith(b"get /v1/models"):
                self.transport.write(MODELS)
            else:
                self.transport.write(NOT_FOUND)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(FixedHTTP, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
