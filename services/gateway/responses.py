"""OpenAI's Responses API (`POST /v1/responses`), translated to and from Chat Completions,
which every engine speaks.

Stateless: `store` is accepted (true is the API's default) but nothing is kept, so
`previous_response_id`, `conversation`, `prompt` (stored prompts) and `item_reference`
items are refused; a client sends the earlier output items back as input instead.
`reasoning`, `truncation`, `include` and `text.verbosity` are accepted and have no effect;
reasoning input items are dropped (only the engine that wrote them could read them). The
engines are text-only and local: image, file and audio parts are refused, as are hosted
tools (web search, file search, computer use...); function tools work.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import msgspec

from appliance.errors import InvalidRequest
from services.gateway.schemas import JsonObjectFormat, PositiveInt, SchemaName, Temperature, TextFormat, TopP


class JsonSchemaFormat(msgspec.Struct, tag="json_schema", tag_field="type", kw_only=True, omit_defaults=True):
    """The Responses API's json_schema format: flat, where Chat Completions nests it."""

    name: SchemaName
    schema: dict
    strict: bool | None = None
    description: str | None = None


class TextConfig(msgspec.Struct):
    format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """The request fields handled here; any other field is ignored."""

    model: str
    input: str | list[dict]
    instructions: str | None = None
    tools: list[dict] = []
    tool_choice: Literal["auto", "none", "required"] | dict = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    store: bool = True  # accepted; nothing is kept either way
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None  # accepted, no effect
    reasoning: dict | None = None  # accepted, no effect
    previous_response_id: str | None = None  # refused: needs stored state
    conversation: str | dict | None = None  # refused: needs stored state
    prompt: dict | None = None  # refused: needs stored prompts


# --- request: Responses -> Chat Completions ----------------------------------------

_STATELESS = "this appliance keeps no responses or conversations; send the earlier items in `input` instead."
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text")
_NO_PARAMETERS = {"type": "object", "properties": {}}
_PASSED = {"max_output_tokens": "max_completion_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "user": "user"}


def to_chat(req: ResponsesRequest) -> dict:
    """The Chat Completions request body for a Responses request."""
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(req, name) is not None:
            raise InvalidRequest(f"'{name}' is not supported: {_STATELESS}", param=name)
    if not req.input and isinstance(req.input, list):
        raise InvalidRequest("'input' is empty: it needs at least one message.", param="input")
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            _add_item(messages, item, f"input[{i}]")
    chat: dict = {"model": req.model, "messages": messages}
    if req.tools:
        chat["tools"] = [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(req.tools)]
        chat["tool_choice"] = _chat_tool_choice(req.tool_choice, {t["function"]["name"] for t in chat["tools"]})
        chat["parallel_tool_calls"] = req.parallel_tool_calls
    elif req.tool_choice not in ("auto", "none"):
        raise InvalidRequest("'tool_choice' asks for a tool but 'tools' is empty.", param="tool_choice")
    format_ = req.text.format if req.text else None
    if isinstance(format_, JsonObjectFormat):
        chat["response_format"] = {"type": "json_object"}
    elif isinstance(format_, JsonSchemaFormat):
        schema = {k: v for k, v in msgspec.to_builtins(format_).items() if k != "type"}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    for ours, theirs in _PASSED.items():
        if getattr(req, ours) is not None:
            chat[theirs] = getattr(req, ours)
    if req.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _add_item(messages: list[dict], item: dict, at: str) -> None:
    kind = item.get("type", "message")  # an "easy" message has no type
    if kind == "message":
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise InvalidRequest(f"'{at}.role' must be one of {', '.join(_ROLES)}.", param=f"{at}.role")
        messages.append({"role": role, "content": _text(item.get("content"), f"{at}.content")})
    elif kind == "function_call":
        call = {"id": _string(item, "call_id", at), "type": "function",
                "function": {"name": _string(item, "name", at), "arguments": _string(item, "arguments", at)}}
        if messages and messages[-1]["role"] == "assistant":  # the calls of one answer share its message
            messages[-1].setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", at),
                         "content": _text(item.get("output"), f"{at}.output")})
    elif kind == "item_reference":
        raise InvalidRequest(f"'item_reference' items are not supported: {_STATELESS}", param=f"{at}.type")
    elif kind != "reasoning":
        raise InvalidRequest(f"Input items of type '{kind}' are not supported on this appliance.", param=f"{at}.type")


def _text(content, at: str) -> str:
    """Text content: a string, or text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{at}' must be a string or a list of text parts.", param=at)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise InvalidRequest(f"Content parts of type '{kind}' are not supported: the models on this appliance"
                                 " read text only.", param=f"{at}[{j}].type")
        texts.append(_string(part, "text", f"{at}[{j}]"))
    return "\n".join(texts)


def _string(item: dict, key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"'{at}.{key}' must be a string.", param=f"{at}.{key}")
    return value


def _chat_tool(tool: dict, at: str) -> dict:
    kind = tool.get("type")
    if kind != "function":
        raise InvalidRequest(f"The '{kind}' tool is not available on this appliance; only function tools are.",
                             param=f"{at}.type")
    # Parameters are optional here; not every engine's chat parser takes a tool without them.
    function = {"name": _string(tool, "name", at), "parameters": tool.get("parameters") or _NO_PARAMETERS}
    function.update({k: tool[k] for k in ("description", "strict") if tool.get(k) is not None})
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict, names: set[str]) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function":
        raise InvalidRequest(f"'tool_choice' of type '{choice.get('type')}' is not available on this appliance;"
                             " use auto, none, required or a function.", param="tool_choice.type")
    if choice.get("name") not in names:
        raise InvalidRequest(f"'tool_choice' names the function '{choice.get('name')}', which is not in 'tools'.",
                             param="tool_choice.name")
    return {"type": "function", "function": {"name": choice["name"]}}


# --- answer: Chat Completions -> Response ------------------------------------------

_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def from_chat(chat: dict, req: ResponsesRequest, response_id: str, created_at: int) -> dict:
    """The Response object for an engine's (non-streamed) chat completion."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    reason = _INCOMPLETE.get(choice.get("finish_reason"))
    status = "incomplete" if reason else "completed"
    suffix = response_id.removeprefix("resp_")
    output = [_message_item(suffix, message["content"], status)] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(_call_item(suffix, len(output), call.get("id"), function.get("name", ""),
                                 function.get("arguments", ""), status))
    return _response(req, response_id, created_at, status, output, _usage(chat.get("usage")), reason)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_item(suffix: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [_text_part(text)]
    return {"id": f"msg_{suffix}", "type": "message", "role": "assistant", "status": status, "content": content}


def _call_item(suffix: str, index: int, call_id: str | None, name: str, arguments: str, status: str) -> dict:
    return {"id": f"fc_{suffix}_{index}", "type": "function_call", "call_id": call_id or f"call_{suffix}_{index}",
            "name": name, "arguments": arguments, "status": status}


def _usage(chat_usage: dict | None) -> dict | None:
    if not chat_usage:
        return None
    prompt, completion = chat_usage.get("prompt_tokens", 0), chat_usage.get("completion_tokens", 0)
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "output_tokens": completion,
            "total_tokens": chat_usage.get("total_tokens", prompt + completion),
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": reasoning}}


def _response(req: ResponsesRequest, response_id: str, created_at: int, status: str, output: list[dict],
              usage: dict | None = None, reason: str | None = None, error: dict | None = None) -> dict:
    """A Response object: the answer plus the request settings it echoes."""
    format_ = req.text.format if req.text and req.text.format else TextFormat()
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status, "model": req.model,
        "output": output, "usage": usage, "error": error,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": req.instructions, "tools": req.tools, "tool_choice": req.tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls, "temperature": req.temperature, "top_p": req.top_p,
        "max_output_tokens": req.max_output_tokens, "text": {"format": msgspec.to_builtins(format_)},
        "truncation": req.truncation or "disabled", "metadata": req.metadata or {}, "user": req.user,
        "previous_response_id": None,
    }


# --- streams: chat chunks -> Responses events ---------------------------------------


class ResponseStream:
    """Turns an engine's Chat Completions stream into Responses SSE events.

    Call start() once, feed() with the JSON payload of each chat `data:` line (not the
    final [DONE]), then finish(); fail() ends a broken stream instead. Each returns the
    encoded events to send (`event: <type>\\ndata: <json>\\n\\n`, possibly none). The
    message is announced with its first text, a tool call once its arguments start (its
    name is whole by then); output indexes follow that order and finish() closes them all.
    """

    def __init__(self, req: ResponsesRequest, response_id: str, created_at: int):
        self._response = partial(_response, req, response_id, created_at)
        self._suffix = response_id.removeprefix("resp_")
        self._seq = 0
        self._items: list[dict] = []  # output items in output order
        self._text: list[str] = []  # the message's deltas
        self._message: dict | None = None
        self._calls: dict[int, dict] = {}  # chat tool call index -> its output item
        self._finish_reason: str | None = None
        self._usage: dict | None = None
        self._ended = False

    def start(self) -> bytes:
        response = self._response("in_progress", [])
        return self._event("response.created", response=response) + self._event("response.in_progress", response=response)

    def feed(self, event_data: bytes) -> bytes:
        if self._ended:
            return b""
        try:
            chunk = msgspec.json.decode(event_data)
        except msgspec.DecodeError:
            chunk = None
        if not isinstance(chunk, dict):
            return self.fail("The engine sent a stream event that is not a JSON object.")
        if "error" in chunk:  # an engine's (or the gateway relay's) mid-stream error
            error = chunk["error"]
            return self.fail(error.get("message") if isinstance(error, dict) else str(error))
        self._usage = chunk.get("usage") or self._usage  # the last chunk: usage, choices []
        choice = (chunk.get("choices") or [{}])[0]
        self._finish_reason = choice.get("finish_reason") or self._finish_reason
        delta = choice.get("delta") or {}
        out = []
        if delta.get("content"):
            if self._message is None:
                out.append(self._open_message())
            self._text.append(delta["content"])
            out.append(self._event("response.output_text.delta", item_id=self._message["id"],
                                   output_index=self._items.index(self._message), content_index=0,
                                   delta=delta["content"], logprobs=[]))
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            item = self._calls.setdefault(call.get("index", 0), {"call_id": None, "name": ""})
            if "id" not in item:  # not announced yet: llama.cpp resends the whole name while it grows
                item["call_id"] = call.get("id") or item["call_id"]
                item["name"] = function.get("name") or item["name"]
            if function.get("arguments"):
                if "id" not in item:  # the name is whole once the arguments start
                    out.append(self._open_call(item))
                item["arguments"] += function["arguments"]
                out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=self._items.index(item), delta=function["arguments"]))
        return b"".join(out)

    def finish(self) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        reason = _INCOMPLETE.get(self._finish_reason)
        status = "incomplete" if reason else "completed"
        out = [self._open_call(item) for item in self._calls.values() if "id" not in item]  # calls with no arguments
        self._close_items(status)
        for index, item in enumerate(self._items):
            if item is self._message:
                part = item["content"][0]
                out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                       content_index=0, text=part["text"], logprobs=[]))
                out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                       content_index=0, part=part))
            else:
                out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                       output_index=index, arguments=item["arguments"]))
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        response = self._response(status, self._items, _usage(self._usage), reason)
        out.append(self._event(f"response.{status}", response=response))
        return b"".join(out)

    def fail(self, message: str) -> bytes:
        """End a stream that broke: an `error` event, then response.failed."""
        if self._ended:
            return b""
        self._ended = True
        self._close_items("incomplete")
        error = {"code": "server_error", "message": message}
        response = self._response("failed", self._items, _usage(self._usage), error=error)
        return self._event("error", param=None, **error) + self._event("response.failed", response=response)

    def _close_items(self, status: str) -> None:
        for item in self._items:
            item["status"] = status
        if self._message is not None:
            self._message["content"] = [_text_part("".join(self._text))]

    def _open_message(self) -> bytes:
        self._message = _message_item(self._suffix, None, "in_progress")
        added = self._added(self._message)
        return added + self._event("response.content_part.added", item_id=self._message["id"],
                                   output_index=len(self._items) - 1, content_index=0, part=_text_part(""))

    def _open_call(self, item: dict) -> bytes:
        item.update(_call_item(self._suffix, len(self._items), item["call_id"], item["name"], "", "in_progress"))
        return self._added(item)

    def _added(self, item: dict) -> bytes:
        self._items.append(item)
        return self._event("response.output_item.added", output_index=len(self._items) - 1, item=item)

    def _event(self, type_: str, **fields) -> bytes:
        data = msgspec.json.encode({"type": type_, "sequence_number": self._seq, **fields})
        self._seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + data + b"\n\n"
