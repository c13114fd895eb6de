"""An engine's answer, read back into what the client asked for: tool calls the gateway
emulated (services/gateway/tool_calls.py), the Responses API (services/gateway/responses.py),
and a non-streamed answer put together from a stream where the engine's own would be
wrong. A plain answer passes through untouched."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import msgspec

from appliance.errors import EngineError, EngineTimeout
from services.gateway.errors import DONE_EVENT
from services.gateway.proxy import EVENT_BOUNDARY
from services.gateway.responses import ResponsesRequest, ResponseStream, from_chat
from services.gateway.tool_calls import ToolPlan

class AnswerReader:
    def __init__(self, tools: ToolPlan | None = None, responses: ResponsesRequest | None = None):
        self.tools = tools
        self.responses = responses
        self.response_id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def complete(self, payload: bytes) -> bytes:
        chat = msgspec.json.decode(payload)
        if self.tools is not None:
            chat = self.tools.answer(chat)
        if self.responses is not None:
            chat = from_chat(chat, self.responses, self.response_id, self.created)
        return msgspec.json.encode(chat)

    async def stream(self, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The relayed SSE pieces, event by event, rewritten."""
        tools = self.tools.stream() if self.tools is not None else None
        responses = ResponseStream(self.responses, self.response_id, self.created) if self.responses else None
        if responses is not None:
            yield responses.start()
        async for payloads in sse_payloads(pieces):
            out = b"".join(self._event(data, tools, responses) for data in payloads)
            if out:
                yield out
        tail = [self._chunk(chunk, responses) for chunk in tools.finish()] if tools is not None else []
        yield b"".join(tail) + (responses.finish() if responses is not None else DONE_EVENT)

    def _event(self, data: bytes, tools, responses: ResponseStream | None) -> bytes:
        if tools is None:
            return responses.feed(data)
        return b"".join(self._chunk(chunk, responses) for chunk in tools.feed(msgspec.json.decode(data)))

    @staticmethod
    def _chunk(chunk: dict, responses: ResponseStream | None) -> bytes:
        data = msgspec.json.encode(chunk)
        return responses.feed(data) if responses is not None else b"data: " + data + b"\n\n"


async def sse_payloads(pieces: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The `data:` payloads of the SSE events in each relayed piece, [DONE] left out."""
    buffer = b""
    async for piece in pieces:
        *events, buffer = EVENT_BOUNDARY.split(buffer + piece)
        payloads = []
        for event in events:
            data = next((line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")), None)
            if data and data != b"[DONE]":
                payloads.append(data)
        yield payloads


async def collect(pieces: AsyncIterator[bytes], call) -> bytes:
    """The non-streamed answer that a call's relayed stream adds up to (chat or
    completions), with the usage the relay counted. An error event raises as its error."""
    answer: dict = {}
    choices: dict[int, dict] = {}
    async for payloads in sse_payloads(pieces):
        for data in payloads:
            chunk = msgspec.json.decode(data)
            if "error" in chunk:
                error = chunk["error"]
                raise (EngineTimeout if error.get("code") == EngineTimeout.code else EngineError)(error.get("message", ""))
            answer = answer or {k: v for k, v in chunk.items() if k not in ("choices", "usage", "timings")}
            for part in chunk.get("choices") or ():
                _add_part(choices.setdefault(part.get("index", 0), {"index": part.get("index", 0)}), part)
    answer["object"] = "chat.completion" if answer.get("object") == "chat.completion.chunk" else "text_completion"
    answer["choices"] = [_finish_choice(choices[i]) for i in sorted(choices)]
    if call.usage is not None:
        answer["usage"] = msgspec.structs.asdict(call.usage)
    return msgspec.json.encode(answer)


def _add_part(choice: dict, part: dict) -> None:
    if part.get("finish_reason"):
        choice["finish_reason"] = part["finish_reason"]
    if "text" in part:  # completions
        choice["text"] = choice.get("text", "") + (part["text"] or "")
    delta = part.get("delta") or {}
    message = choice.setdefault("message", {"role": "assistant", "content": None}) if "delta" in part else None
    for key in ("content", "reasoning_content"):
        if delta.get(key):
            message[key] = (message.get(key) or "") + delta[key]
    for call in delta.get("tool_calls") or ():
        calls = message.setdefault("tool_calls", [])
        while len(calls) <= call.get("index", 0):
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        made = calls[call.get("index", 0)]
        made["id"] = call.get("id") or made["id"]
        function = call.get("function") or {}
        made["function"]["name"] = function.get("name") or made["function"]["name"]  # sent whole
        made["function"]["arguments"] += function.get("arguments") or ""
    logprobs = (part.get("logprobs") or {}).get("content")
    if logprobs:
        choice.setdefault("logprobs", {"content": []})["content"].extend(logprobs)


def _finish_choice(choice: dict) -> dict:
    choice.setdefault("finish_reason", None)
    choice.setdefault("logprobs", None)
    return choice
