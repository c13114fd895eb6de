"""The engine adapter: what an engine needs done to a valid OpenAI request before it gets
it, and to its answer after. Compatibility is owned here, once, so a client sees one API
whatever serves the model (DESIGN, "Flow of a request").

Every local engine (llama.cpp, vLLM): a field beyond the OpenAI API is a 400 naming it,
unless it is a bounded sampling extension or the profile allows it
(services/gateway/engine_params.py).

Every engine: `n` is bounded by gateway.max_n; JSON Schemas (response_format, tool
parameters) must be valid JSON Schema and a named tool_choice must name an offered
function, so a mistake is a 400 naming it, whatever the engine would make of it; a stream always asks the engine for usage
(metering needs it), hidden again from a client that did not ask; the model is renamed to
the upstream's name where the profile says so; a budgeted caller's request that names no
completion limit, to a model of unknown context, gets the one its reservation assumed
(services/gateway/admission.py budget_cap): `max_completion_tokens` on chat (OpenAI's
current field, read by vLLM and llama.cpp, and the only one OpenAI's reasoning models
take), `max_tokens` on completions.

llama.cpp's server reads developer messages, text parts, max_completion_tokens, n,
response_format, seed, stop and logit_bias itself. The adapter adds what it lacks:
- text only: image, audio and file parts are refused by name (400), not failed (500);
- tool_choice naming a function (it takes strings only): "required" over that function;
- every answer is asked as a stream, with running token counts in each chunk
  (`timings_per_token`), and a non-streamed one is answered whole from it: an answer cut
  short (the client left, the engine died) is metered with the tokens generated until
  then, and `n` > 1 counts every choice's tokens (its whole answer counts one choice's);
- tools on a model whose chat template cannot show them (GET /props says so; the engine
  would silently ignore them): emulated with JSON-schema-constrained decoding
  (services/gateway/tool_calls.py), earlier calls and results shown as text.
vLLM and remote upstreams otherwise get the request as the client sent it.
"""

from __future__ import annotations

import jsonschema
import msgspec

from appliance.errors import InvalidRequest
from services.gateway import engine_params, tool_calls
from services.gateway.replicas import ModelPool
from services.gateway.schemas import ChatCompletionRequest, EmbeddingRequest, JsonSchemaFormat, NamedToolChoice, TextPart


class Outgoing:
    """The body to forward: the client's bytes until something must change, then a dict."""

    __slots__ = ("_body", "_data")

    def __init__(self, body: bytes | None = None, data: dict | None = None):
        self._body, self._data = body, data

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = msgspec.json.decode(self._body)
        return self._data

    def encode(self) -> bytes:
        return self._body if self._data is None else msgspec.json.encode(self._data)


class Adapted(msgspec.Struct):
    body: bytes
    hide_usage: bool  # the engine's usage chunk is for metering only
    tools: tool_calls.ToolPlan | None = None  # the answer is read back through it
    collect: bool = False  # asked as a stream, answered whole (services/gateway/answers.collect)


def adapt(outgoing: Outgoing, parsed, pool: ModelPool, max_n: int, cap: int | None = None) -> Adapted:
    """The request for `pool`'s engine, bounded by `cap` completion tokens where given
    (services/gateway/admission.py budget_cap); raises InvalidRequest naming what it cannot serve."""
    if pool.served.engine != "remote":
        engine_params.check(outgoing.data, parsed, pool.served)  # decoded once: llama.cpp's request changes anyway
    if isinstance(parsed, EmbeddingRequest):
        if pool.served.upstream_model:
            outgoing.data["model"] = pool.served.upstream_model
        return Adapted(outgoing.encode(), False)
    if parsed.n and parsed.n > max_n:
        raise InvalidRequest(f"'n' is {parsed.n}; this appliance answers at most {max_n} choices per request "
                             "(gateway.max_n).", param="n")
    served = pool.served
    if cap is not None:  # the request names no limit: the one its reservation assumed
        outgoing.data["max_completion_tokens" if isinstance(parsed, ChatCompletionRequest) else "max_tokens"] = cap
    plan = None
    if isinstance(parsed, ChatCompletionRequest):
        _check_chat(parsed)
    if served.engine == "llamacpp" and isinstance(parsed, ChatCompletionRequest):
        _refuse_non_text(parsed, served.name)
        if pool.native_tools is not True and _uses_tools(parsed):  # not known yet: emulated too
            plan = tool_calls.emulate(outgoing.data, served.context_length)
        elif isinstance(parsed.tool_choice, NamedToolChoice):
            _require_named(outgoing.data, parsed)
    collect = served.engine == "llamacpp" and not parsed.stream
    if collect:
        outgoing.data["stream"] = True
    hide_usage = collect or (parsed.stream and not (parsed.stream_options and parsed.stream_options.include_usage))
    if hide_usage:
        data = outgoing.data
        data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
    if served.upstream_model:
        outgoing.data["model"] = served.upstream_model
    if served.engine == "llamacpp":
        # Running counts in every chunk: an answer cut short is metered from its last chunk
        # (services/gateway/proxy.py). Streaming clients see them as `timings`, which OpenAI's SDKs ignore.
        outgoing.data["timings_per_token"] = True
    return Adapted(outgoing.encode(), hide_usage, plan, collect)


def _check_chat(parsed: ChatCompletionRequest) -> None:
    """What no engine can answer: a named function that is not offered, an invalid JSON Schema."""
    if isinstance(parsed.tool_choice, NamedToolChoice):
        name = parsed.tool_choice.function.name
        if name not in {tool.function.name for tool in parsed.tools or ()}:
            raise InvalidRequest(f"tool_choice names the function '{name}', which is not among `tools`.",
                                 param="tool_choice.function.name")
    if isinstance(parsed.response_format, JsonSchemaFormat):
        _check_schema(parsed.response_format.json_schema.schema, "response_format.json_schema.schema")
    for i, tool in enumerate(parsed.tools or ()):
        if tool.function.parameters is not None:
            _check_schema(tool.function.parameters, f"tools[{i}].function.parameters")


def _check_schema(schema: dict, param: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        raise InvalidRequest(f"'{param}' is not a valid JSON Schema: {exc.message}{f' (at {where})' if where else ''}.",
                             param=param) from None
    except RecursionError:
        raise InvalidRequest(f"'{param}' is nested too deeply to check.", param=param) from None


def _uses_tools(parsed: ChatCompletionRequest) -> bool:
    """Tools offered, or earlier tool calls and results that a template without tools cannot show."""
    return bool(parsed.tools) or any(m.role in ("tool", "function") or m.tool_calls for m in parsed.messages)


def _refuse_non_text(parsed: ChatCompletionRequest, model: str) -> None:
    for i, message in enumerate(parsed.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if not isinstance(part, TextPart):
                    param = f"messages[{i}].content[{j}].type"
                    raise InvalidRequest(f"'{param}' is '{type(part).__struct_config__.tag}': the model '{model}' reads "
                                         "text only.", param=param, code="unsupported_content")


def _require_named(data: dict, parsed: ChatCompletionRequest) -> None:
    name = parsed.tool_choice.function.name
    data["tools"] = [tool for tool in data["tools"] if tool["function"]["name"] == name][:1]
    data["tool_choice"] = "required"
