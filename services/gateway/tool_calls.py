"""OpenAI tool calling emulated with JSON-schema-constrained decoding, for engines whose
chat template has no tools (llama-server then ignores `tools` and `tool_choice`).

emulate() rewrites a Chat Completions request for the engine: the functions are described
in the system message, earlier tool calls and results become plain text turns, and a
`response_format` json_schema makes the engine's grammar allow only a reply of the form

    {"tool_calls": [{"name": <a function>, "arguments": <its parameters>}, ...]}
    {"response": <the answer: a string, or the client's own response_format schema>}

(the second only when the model may choose, tool_choice "auto"). The ToolPlan it returns
turns the engine's answer, whole or streamed, back into OpenAI's: `message.tool_calls`
and finish_reason "tool_calls", or the response text. A reply cut off by max_tokens keeps
the calls written whole before the cut; with none (or a reply that does not parse) it
comes back as text with finish_reason "length", never an error. A call repeated with the
same arguments is returned once.

Pure translation: no I/O.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Literal

from appliance.errors import InvalidRequest

Mode = Literal["auto", "required", "named"]

_NO_PARAMETERS = {"type": "object", "properties": {}}
_ID_ALPHABET = string.ascii_letters + string.digits
_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')
_CALLS_START = re.compile(r'\s*\{\s*"tool_calls"')
_CALLS_ARRAY = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')


def call_id() -> str:
    """A tool call id as OpenAI writes them: call_ and 24 letters or digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# --- request -----------------------------------------------------------------------


def emulate(body: dict, max_tokens_default: int | None = None) -> ToolPlan | None:
    """Rewrite a Chat Completions request (in place) for an engine without tool support.

    Earlier tool calls and results in `messages` are always re-rendered as plain turns.
    Returns None when there is nothing to emulate (no tools, or tool_choice "none": the
    tool fields are then removed and the engine answers a plain chat); otherwise the plan
    that reads the engine's answer. Without max_tokens or max_completion_tokens, the
    answer is bounded by `max_tokens_default` (when given).
    """
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    names = _tool_names(tools)
    mode = _mode(choice, names)
    response_kind = _response_kind(body, mode)
    parallel = body.get("parallel_tool_calls") is True
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = _render_history(messages)
    for field in ("tools", "tool_choice", "parallel_tool_calls"):
        body.pop(field, None)
    if mode is None:
        return None
    if mode == "named":
        tools = [tool for tool in tools if tool["function"]["name"] == choice["function"]["name"]]
    plan = ToolPlan(mode, [tool["function"]["name"] for tool in tools], parallel, response_kind)
    schema, prompt = _reply_schema(plan, tools, body.get("response_format"))
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    _add_system(body, prompt)
    if max_tokens_default is not None and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_tokens_default
    return plan


def _tool_names(tools) -> list[str]:
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list of function tools.", param="tools")
    names = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(f"The '{kind}' tool is not available on this appliance; only function tools are.",
                                 param=f"tools[{i}].type")
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"'tools[{i}].function.name' must be a string.", param=f"tools[{i}].function.name")
        if name in names:
            raise InvalidRequest(f"The function '{name}' is defined twice in 'tools'.",
                                 param=f"tools[{i}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidRequest(f"'tools[{i}].function.parameters' must be a JSON Schema object.",
                                 param=f"tools[{i}].function.parameters")
        names.append(name)
    return names


def _mode(choice, names: list[str]) -> Mode | None:
    if choice is None or choice == "auto":
        return "auto" if names else None
    if choice == "none":
        return None
    if choice == "required":
        if not names:
            raise InvalidRequest("'tool_choice' is 'required' but 'tools' is empty.", param="tool_choice")
        return "required"
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise InvalidRequest(f"'tool_choice' names the function '{name}', which is not in 'tools'.",
                                 param="tool_choice.function.name")
        return "named"
    raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or"
                         " {\"type\": \"function\", \"function\": {\"name\": ...}}.", param="tool_choice")


def _response_kind(body: dict, mode: Mode | None) -> Literal["text", "json"]:
    """How an "auto" reply's response is read: text, or JSON for a client's response_format."""
    format_ = body.get("response_format")
    if mode != "auto" or format_ is None:
        return "text"
    kind = format_.get("type") if isinstance(format_, dict) else None
    if kind == "text":
        return "text"
    if kind in ("json_object", "json_schema"):
        return "json"
    raise InvalidRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                         param="response_format.type")


def _reply_schema(plan: ToolPlan, tools: list[dict], format_: dict | None) -> tuple[dict, str]:
    """The JSON Schema the engine's reply must match, and the system prompt that explains it."""
    defs: dict = {}
    calls = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        arguments = _embed(function.get("parameters") or _NO_PARAMETERS, f"tool{i}", defs)
        calls.append(_object({"name": {"const": function["name"]}, "arguments": arguments}))
    items: dict = {"minItems": 1} if plan.parallel else {"minItems": 1, "maxItems": 1}
    calls_schema = _object({"tool_calls": {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                           **items}})
    lines = ["You can call these functions:", ""]
    for tool in tools:
        function = tool["function"]
        lines.append(f"### {function['name']}")
        if function.get("description"):
            lines.append(str(function["description"]))
        lines.append("Parameters (JSON Schema): " + _dumps(function.get("parameters") or _NO_PARAMETERS))
        lines.append("")
    name = plan.names[0] if plan.mode == "named" else "<function name>"
    call_form = '{"tool_calls": [{"name": "%s", "arguments": {<arguments that match its parameters>}}]}' % name
    if plan.mode == "named":
        lines.append(f"You must call the function {name}. Reply with JSON only, in this form:")
        lines.append(call_form)
    elif plan.mode == "required":
        lines.append("You must call one of these functions. Reply with JSON only, in this form:")
        lines.append(call_form)
    else:
        lines.append("Reply with JSON only, in one of these forms.")
        lines.append("To call a function: " + call_form)
    schema = calls_schema
    if plan.mode == "auto":
        if plan.response_kind == "text":
            response, form = {"type": "string"}, '{"response": "<your answer>"}'
        else:
            client = _client_schema(format_)
            response, form = _embed(client, "response", defs), '{"response": <your answer as JSON>}'
        lines.append("To answer without calling a function: " + form)
        if plan.response_kind == "json":
            lines.append("The answer must match this JSON Schema: " + _dumps(client))
        schema = {"anyOf": [calls_schema, _object({"response": response})]}
    lines.append("To call several functions at once, put one entry per call in tool_calls." if plan.parallel
                 else "Call one function at a time.")
    lines.append('Function results are given to you in messages that begin with "Result of".')
    if defs:
        schema = {"$defs": defs, **schema}
    return schema, "\n".join(lines)


def _client_schema(format_: dict) -> dict:
    if format_.get("type") == "json_object":
        return {"type": "object"}
    json_schema = format_.get("json_schema")
    schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
    if schema is None:
        schema = {}
    if not isinstance(schema, dict):
        raise InvalidRequest("'response_format.json_schema.schema' must be a JSON Schema object.",
                             param="response_format.json_schema.schema")
    return schema


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _embed(schema: dict, key: str, defs: dict) -> dict:
    """A schema to nest inside the reply's. One with references ("#/$defs/...", "#") moves
    under the reply's $defs as `key`, its references rewritten to point into it there."""
    if not _has_ref(schema):
        return schema
    defs[key] = _rebase(schema, f"#/$defs/{key}")
    return {"$ref": f"#/$defs/{key}"}


def _has_ref(value) -> bool:
    if isinstance(value, dict):
        return any(k == "$ref" or _has_ref(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_ref(v) for v in value)
    return False


def _rebase(value, base: str):
    if isinstance(value, dict):
        return {k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase(v, base))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, base) for v in value]
    return value


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _add_system(body: dict, prompt: str) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        text = _text(first.get("content"), "messages[0].content")
        messages[0] = {**first, "role": "system", "content": f"{text}\n\n{prompt}" if text else prompt}
    else:
        messages.insert(0, {"role": "system", "content": prompt})


# --- earlier turns -------------------------------------------------------------------


def _render_history(messages: list) -> list:
    """Earlier tool calls and results as turns a template without tools can show: an
    assistant's calls become its JSON reply, a result a user message naming the function."""
    if not any(isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls")
                                        or m.get("function_call")) for m in messages):
        return messages
    names: dict = {}  # tool call id -> function name
    out: list = []
    results: dict | None = None  # the user message that collects consecutive results
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            results = None
            continue
        role = message.get("role")
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            calls = []
            for call in message.get("tool_calls") or [{"function": message["function_call"]}]:
                call = call if isinstance(call, dict) else {}
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                names[call.get("id")] = function.get("name")
                calls.append({"name": function.get("name"), "arguments": _arguments(function.get("arguments"))})
            text = _text(message.get("content"), f"messages[{i}].content")
            reply = _dumps({"tool_calls": calls})
            rendered = {k: v for k, v in message.items() if k not in ("tool_calls", "function_call")}
            out.append({**rendered, "content": f"{text}\n{reply}" if text else reply})
            results = None
        elif role in ("tool", "function"):
            id_ = message.get("tool_call_id")
            name = names.get(id_) or message.get("name") or "a function"
            text = _text(message.get("content"), f"messages[{i}].content")
            line = f"Result of {name} ({id_}): {text}" if id_ else f"Result of {name}: {text}"
            if results is None:
                results = {"role": "user", "content": line}
                out.append(results)
            else:
                results["content"] += "\n\n" + line
        else:
            out.append(message)
            results = None
    return out


def _arguments(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}


def _text(content, at: str) -> str:
    """Message content as text: a string, or its text parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"'{at}' must be a string or a list of text parts.", param=at)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            raise InvalidRequest(f"Content parts of type '{kind}' are not supported here: the models on this"
                                 " appliance read text only.", param=f"{at}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


# --- answers -----------------------------------------------------------------------


class ToolPlan:
    """How to read the engine's reply to a request that emulate() rewrote."""

    __slots__ = ("mode", "names", "parallel", "response_kind")

    def __init__(self, mode: Mode, names: list[str], parallel: bool, response_kind: Literal["text", "json"]):
        self.mode = mode
        self.names = names  # the functions the reply may call
        self.parallel = parallel
        self.response_kind = response_kind

    def answer(self, chat: dict) -> dict:
        """The OpenAI chat completion for the engine's (non-streamed) one."""
        out = dict(chat)
        out["choices"] = [self._answer_choice(choice) for choice in chat.get("choices") or []]
        return out

    def stream(self) -> ToolStream:
        return ToolStream(self)

    def _answer_choice(self, choice: dict) -> dict:
        message = dict(choice.get("message") or {})
        message["role"] = "assistant"
        calls, text, reason = self.read(message.get("content") or "", choice.get("finish_reason"))
        if calls is not None:
            message["content"] = None
            message["tool_calls"] = calls
        else:
            message["content"] = text
        return {**choice, "message": message, "finish_reason": reason}

    def read(self, content: str, finish_reason: str | None) -> tuple[list[dict] | None, str, str]:
        """(tool calls or None, text, finish reason) for the engine's whole reply."""
        try:
            reply = json.loads(content)
        except ValueError:
            reply = None
        if isinstance(reply, dict):
            calls = self._calls(reply)
            if calls is not None:
                return calls, "", "tool_calls"
            if self.mode == "auto" and set(reply) == {"response"}:
                value = reply["response"]
                if self.response_kind == "text" and isinstance(value, str):
                    return None, value, finish_reason or "stop"
                if self.response_kind == "json":
                    return None, _dumps(value), finish_reason or "stop"
        # Cut off: the calls written whole before the cut still count (a small model may
        # repeat a call until max_tokens); else the text so far, bounded as asked.
        if (calls := self._calls({"tool_calls": _whole_calls(content)})) is not None:
            return calls, "", "tool_calls"
        if self.mode == "auto" and self.response_kind == "text" and (start := _RESPONSE_START.match(content)):
            return None, _JsonString().feed(content[start.end():]), "length"
        return None, content, "length"

    def _calls(self, reply: dict) -> list[dict] | None:
        calls = reply.get("tool_calls")
        if set(reply) != {"tool_calls"} or not isinstance(calls, list) or not calls:
            return None
        out, seen = [], set()
        for call in calls:
            if not isinstance(call, dict) or call.get("name") not in self.names or "arguments" not in call:
                return None
            function = {"name": call["name"], "arguments": _dumps(call["arguments"])}
            if (function["name"], function["arguments"]) not in seen:  # a repeated call is said once
                seen.add((function["name"], function["arguments"]))
                out.append({"id": call_id(), "type": "function", "function": function})
        return out


def _whole_calls(content: str) -> list:
    """The complete call objects at the start of a `{"tool_calls": [...` reply cut short."""
    start = _CALLS_ARRAY.match(content)
    if start is None:
        return []
    calls, at, decoder = [], start.end(), json.JSONDecoder()
    while True:
        try:
            call, at = decoder.raw_decode(content, at + len(content[at:]) - len(content[at:].lstrip()))
        except ValueError:
            return calls
        calls.append(call)
        rest = content[at:].lstrip()
        if not rest.startswith(","):
            return calls
        at = len(content) - len(rest) + 1


class _Choice:
    __slots__ = ("content", "announced", "text", "calls", "finished")

    def __init__(self):
        self.content: list[str] = []  # the engine's content deltas: the JSON reply
        self.announced = False  # the role delta has been sent
        self.text: _JsonString | None = None  # set once the reply shows itself a text response
        self.calls = False  # the reply shows itself tool calls
        self.finished = False


class ToolStream:
    """Turns the engine's streamed reply (chat.completion.chunk payloads, JSON-decoded)
    into OpenAI's chunks.

    The first engine chunk of a choice is answered at once with the role delta. A text
    response ("auto") streams as its JSON string decodes; tool calls, and a response in
    the client's JSON format, are sent when the choice finishes: one chunk per call
    (index, id, type, name and the whole arguments), then one with finish_reason
    "tool_calls". Payloads without choices (the usage chunk, an error) pass through
    unchanged, after every started choice has finished. Call finish() at the end of the
    stream (before [DONE]); it flushes a choice the engine never finished, as cut off.
    """

    def __init__(self, plan: ToolPlan):
        self._plan = plan
        self._choices: dict[int, _Choice] = {}
        self._held: list[dict] = []  # payloads that wait for the choices to finish
        self._template: dict = {}  # the engine's chunk fields (id, created, model, object...)

    def feed(self, payload: dict) -> list[dict]:
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not choices:
            if all(c.finished for c in self._choices.values()):
                return [payload]
            self._held.append(payload)
            return []
        self._template = {k: v for k, v in payload.items() if k not in ("choices", "usage")}
        out: list[dict] = []
        for engine_choice in choices:
            index = engine_choice.get("index", 0)
            choice = self._choices.setdefault(index, _Choice())
            if choice.finished:
                continue
            if not choice.announced:
                choice.announced = True
                out.append(self._chunk(index, {"role": "assistant", "content": None}))
            delta = engine_choice.get("delta") or {}
            if delta.get("content"):
                choice.content.append(delta["content"])
                out.extend(self._stream_text(index, choice, delta["content"]))
            if engine_choice.get("finish_reason"):
                out.extend(self._finish(index, choice, engine_choice["finish_reason"], payload.get("usage")))
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        for index, choice in self._choices.items():
            if not choice.finished:
                out.extend(self._finish(index, choice, "length", None))
        out.extend(self._held)
        self._held = []
        return out

    def _stream_text(self, index: int, choice: _Choice, content: str) -> list[dict]:
        if choice.text is None:
            if choice.calls or self._plan.mode != "auto" or self._plan.response_kind != "text":
                return []
            reply = "".join(choice.content)
            start = _RESPONSE_START.match(reply)
            if start is None:
                choice.calls = _CALLS_START.match(reply) is not None  # then stop looking
                return []
            choice.text = _JsonString()
            decoded = choice.text.feed("".join(choice.content)[start.end():])
        else:
            decoded = choice.text.feed(content)
        return [self._chunk(index, {"content": decoded})] if decoded else []

    def _finish(self, index: int, choice: _Choice, engine_reason: str, usage) -> list[dict]:
        choice.finished = True
        out = []
        if choice.text is not None:  # the text has streamed already
            reason = engine_reason if choice.text.done else "length"
        else:
            calls, text, reason = self._plan.read("".join(choice.content), engine_reason)
            for i, call in enumerate(calls or []):
                out.append(self._chunk(index, {"tool_calls": [{"index": i, **call}]}))
            if calls is None and text:
                out.append(self._chunk(index, {"content": text}))
        last = self._chunk(index, {}, reason)
        if usage is not None:
            last["usage"] = usage
        out.append(last)
        return out

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {**self._template, "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}


# --- JSON strings, as they arrive ---------------------------------------------------

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class _JsonString:
    """Decodes the body of a JSON string (after its opening quote) piece by piece; an
    escape split between pieces waits for the rest. `done` once the closing quote came."""

    __slots__ = ("raw", "pos", "done")

    def __init__(self):
        self.raw = ""
        self.pos = 0
        self.done = False

    def feed(self, piece: str) -> str:
        """The text that `piece` completes."""
        self.raw += piece
        raw, out = self.raw, []
        while not self.done and self.pos < len(raw):
            pos = self.pos
            char = raw[pos]
            if char == '"':
                self.done = True
                self.pos += 1
            elif char != "\\":
                end = pos
                while end < len(raw) and raw[end] not in '"\\':
                    end += 1
                out.append(raw[pos:end])
                self.pos = end
            elif pos + 1 >= len(raw):
                break
            elif raw[pos + 1] != "u":
                out.append(_ESCAPES.get(raw[pos + 1], raw[pos + 1]))
                self.pos += 2
            else:
                decoded = self._unicode(raw, pos)
                if decoded is None:
                    break
                out.append(decoded)
        return "".join(out)

    def _unicode(self, raw: str, pos: int) -> str | None:
        """A \\uXXXX escape (with the low half of a surrogate pair); None until it is whole."""
        code = _hex(raw[pos + 2 : pos + 6])
        if code is None:
            if pos + 6 > len(raw):
                return None
            self.pos = pos + 6  # not a valid escape: keep it as written
            return raw[pos : pos + 6]
        if 0xDC00 <= code <= 0xDFFF:
            self.pos = pos + 6
            return "\ufffd"
        if not 0xD800 <= code <= 0xDBFF:
            self.pos = pos + 6
            return chr(code)
        following = raw[pos + 6 : pos + 12]
        if len(following) < 6 and "\\u".startswith(following[:2]):
            return None  # the low half may still come
        low = _hex(following[2:]) if following.startswith("\\u") else None
        if low is not None and 0xDC00 <= low <= 0xDFFF:
            self.pos = pos + 12
            return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))
        self.pos = pos + 6
        return "\ufffd"


def _hex(digits: str) -> int | None:
    if len(digits) != 4 or any(c not in string.hexdigits for c in digits):
        return None
    return int(digits, 16)
