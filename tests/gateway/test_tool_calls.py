"""Tool calling emulated with constrained decoding (services/gateway/tool_calls.py): the
rewritten requests, answers and streams checked against the openai SDK's own types, read
by the real SDK client from a loopback server that does what the gateway will do, then
the same against the real llama.cpp engine with the default model (whose chat template
has no tools)."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jsonschema
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from appliance.config import load_profile
from appliance.errors import InvalidRequest
from services.gateway.tool_calls import _JsonString, emulate
from tests.conftest import running_engine
from tests.functions import PARAMETERS, TIME, TOOLS, WEATHER

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALL_ID = re.compile(r"^call_[A-Za-z0-9]{24}$")


def chat_body(**fields) -> dict:
    return {"model": "smol", "messages": [dict(SYSTEM), dict(QUESTION)], "tools": copy.deepcopy(TOOLS), **fields}


def reply_schema(body: dict) -> dict:
    assert body["response_format"]["type"] == "json_schema"
    return body["response_format"]["json_schema"]["schema"]


def valid(schema: dict, reply) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(reply)


# --- requests ---------------------------------------------------------------------


def test_required_forces_one_call_to_any_tool():
    body = chat_body(tool_choice="required", parallel_tool_calls=False)
    plan = emulate(body, 64)
    assert plan.mode == "required" and plan.names == ["get_weather", "get_time"]
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(body)
    assert body["max_tokens"] == 64
    system = body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You are a helpful assistant.\n\n")
    for tool in TOOLS:
        assert tool["function"]["name"] in system["content"] and tool["function"]["description"] in system["content"]
        assert json.dumps(tool["function"]["parameters"]) in system["content"]
    assert "You must call one of these functions" in system["content"]
    assert body["messages"][1:] == [QUESTION]
    schema = reply_schema(body)
    assert valid(schema, {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    assert valid(schema, {"tool_calls": [{"name": "get_time", "arguments": {"tz": "CET"}}]})
    assert not valid(schema, {"tool_calls": []})  # a call is required
    assert not valid(schema, {"tool_calls": [{"name": "get_time", "arguments": {"city": "Paris"}}]})
    assert not valid(schema, {"tool_calls": [{"name": "other", "arguments": {}}]})
    assert not valid(schema, {"response": "Sunny"})  # no text answer
    two = {"name": "get_time", "arguments": {"tz": "CET"}}
    assert not valid(schema, {"tool_calls": [two, two]})  # one call at a time


def test_parallel_tool_calls_allow_several_calls():
    body = chat_body(tool_choice="required", parallel_tool_calls=True)
    assert emulate(body).parallel
    assert "max_tokens" not in body  # no default given: the caller decides
    call = {"name": "get_time", "arguments": {"tz": "CET"}}
    assert valid(reply_schema(body), {"tool_calls": [call, call]})
    assert "several functions at once" in body["messages"][0]["content"]


def test_named_function_forces_that_function():
    body = chat_body(tool_choice={"type": "function", "function": {"name": "get_time"}}, max_completion_tokens=30)
    plan = emulate(body, 64)
    assert plan.mode == "named" and plan.names == ["get_time"]
    assert "max_tokens" not in body and body["max_completion_tokens"] == 30  # the client's bound stays
    schema = reply_schema(body)
    assert valid(schema, {"tool_calls": [{"name": "get_time", "arguments": {"tz": "UTC"}}]})
    assert not valid(schema, {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    assert "get_weather" not in body["messages"][0]["content"]
    assert "You must call the function get_time" in body["messages"][0]["content"]


def test_named_function_not_in_tools_is_a_client_error():
    body = chat_body(tool_choice={"type": "function", "function": {"name": "get_stock"}})
    with pytest.raises(InvalidRequest) as error:
        emulate(body)
    assert error.value.param == "tool_choice.function.name" and "get_stock" in error.value.message
    assert body["tools"] == TOOLS  # refused before anything changed


@pytest.mark.parametrize(("body", "param"), [
    (chat_body(tools=[], tool_choice="required"), "tool_choice"),
    (chat_body(tool_choice="always"), "tool_choice"),
    (chat_body(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type"),
    (chat_body(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
    (chat_body(response_format={"type": "xml"}), "response_format.type"),
])
def test_bad_tool_requests_name_the_parameter(body, param):
    with pytest.raises(InvalidRequest) as error:
        emulate(body)
    assert error.value.param == param and error.value.status == 400


def test_auto_lets_the_model_answer_in_text():
    body = chat_body()  # tool_choice defaults to auto
    plan = emulate(body, 64)
    assert plan.mode == "auto" and plan.response_kind == "text"
    schema = reply_schema(body)
    assert valid(schema, {"response": "It is sunny."})
    assert valid(schema, {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    assert not valid(schema, {"response": 3})
    assert '{"response": "<your answer>"}' in body["messages"][0]["content"]


def test_auto_with_the_clients_json_schema():
    answer = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
              "required": ["city", "temp"]}
    body = chat_body(response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": answer}})
    assert emulate(body).response_kind == "json"
    schema = reply_schema(body)
    assert valid(schema, {"response": {"city": "Paris", "temp": 21.5}})
    assert not valid(schema, {"response": "sunny"})
    assert json.dumps(answer) in body["messages"][0]["content"]
    body = chat_body(response_format={"type": "json_object"})
    emulate(body)
    assert valid(reply_schema(body), {"response": {"any": "object"}})
    assert not valid(reply_schema(body), {"response": "text"})


def test_forced_call_replaces_the_clients_response_format():
    body = chat_body(tool_choice="required", response_format={"type": "json_object"})
    emulate(body)
    assert not valid(reply_schema(body), {"response": {}})


def test_references_in_parameters_point_into_the_reply_schema():
    """openai.pydantic_function_tool (and Pydantic) write nested models as $defs and $ref."""
    parameters = {"$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"},
                                                                       "unit": {"$ref": "#/$defs/Unit"}},
                                      "required": ["city", "unit"]},
                            "Unit": {"enum": ["c", "f"]}},
                  "type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"]}
    tool = {"type": "function", "function": {"name": "forecast", "parameters": parameters}}
    body = chat_body(tools=[TIME, tool], tool_choice="required")
    emulate(body)
    schema = reply_schema(body)
    assert valid(schema, {"tool_calls": [{"name": "forecast", "arguments": {"place": {"city": "Oslo", "unit": "c"}}}]})
    assert not valid(schema, {"tool_calls": [{"name": "forecast", "arguments": {"place": {"city": "Oslo",
                                                                                          "unit": "k"}}}]})
    assert valid(schema, {"tool_calls": [{"name": "get_time", "arguments": {"tz": "UTC"}}]})


def test_tool_choice_none_and_no_tools_leave_a_plain_chat():
    body = chat_body(tool_choice="none", parallel_tool_calls=True)
    assert emulate(body, 64) is None
    assert body == {"model": "smol", "messages": [SYSTEM, QUESTION]}  # nothing to bound either
    plain = {"model": "smol", "messages": [QUESTION], "response_format": {"type": "json_object"}}
    before = copy.deepcopy(plain)
    assert emulate(plain, 64) is None and plain == before


def test_earlier_calls_and_results_become_plain_turns():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "Sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "14:05"}]},
        {"role": "assistant", "content": "Sunny, 21 C, and it is 14:05."},
        {"role": "user", "content": "Thanks"},
    ]
    body = chat_body(messages=messages)
    emulate(body)
    rendered = body["messages"]
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\nBe kind.\n\nYou can call")
    assert rendered[1] == messages[1]
    assert rendered[2]["role"] == "assistant" and "tool_calls" not in rendered[2]
    assert json.loads(rendered[2]["content"]) == {"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"tz": "CET"}}]}
    assert rendered[3] == {"role": "user", "content": "Result of get_weather (call_a): Sunny, 21 C\n\n"
                                                      "Result of get_time (call_b): 14:05"}
    assert rendered[4:] == messages[5:]
    assert all(isinstance(m["content"], str) for m in rendered)
    # Without tools on this turn, the history still has to be shown as text.
    body = {"model": "smol", "messages": copy.deepcopy(messages[1:5])}
    assert emulate(body) is None
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


# --- answers -----------------------------------------------------------------------


def engine_answer(*contents: str, finish_reason: str = "stop") -> dict:
    """A llama-server chat completion (as recorded from it) with these message contents."""
    return {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1733000000, "model": "smol",
            "system_fingerprint": "b1-0c1e570",
            "choices": [{"index": i, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": content}} for i, content in enumerate(contents)],
            "usage": {"prompt_tokens": 200, "completion_tokens": 38, "total_tokens": 238}}


CALL_REPLY = '{\n  "tool_calls": [{"name": "get_weather", "arguments": {\n    "city": "Paris"\n  }}\n]\n}'


def forced_plan(**fields):
    return emulate(chat_body(tool_choice="required", **fields), 64)


def test_answer_with_a_tool_call():
    chat = forced_plan().answer(engine_answer(CALL_REPLY))
    completion = ChatCompletion.model_validate(chat)
    assert (completion.id, completion.model, completion.created) == ("chatcmpl-abc", "smol", 1733000000)
    assert completion.usage.completion_tokens == 38
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert CALL_ID.match(call.id) and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_answer_in_text():
    plan = emulate(chat_body(), 64)
    chat = plan.answer(engine_answer('{"response": "It is \\"sunny\\" \\u263c"}'))
    choice = ChatCompletion.model_validate(chat).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == 'It is "sunny" \u263c'
    assert not choice.message.tool_calls
    plan = emulate(chat_body(response_format={"type": "json_object"}), 64)
    choice = ChatCompletion.model_validate(plan.answer(engine_answer('{"response": {"temp": 21}}'))).choices[0]
    assert json.loads(choice.message.content) == {"temp": 21}


def test_cut_off_reply_comes_back_as_text():
    cut = '{\n  "tool_calls": [{"name": "get_weather", "arguments": {\n    "ci'
    choice = ChatCompletion.model_validate(forced_plan().answer(engine_answer(cut, finish_reason="length"))).choices[0]
    assert choice.finish_reason == "length" and choice.message.content == cut and not choice.message.tool_calls
    choice = forced_plan().answer(engine_answer("not json at all"))["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "not json at all"
    # A text response cut off reads as the text so far.
    cut = '{"response": "It is sunny and \\u263'
    choice = emulate(chat_body(), 64).answer(engine_answer(cut, finish_reason="length"))["choices"][0]
    assert choice["message"]["content"] == "It is sunny and " and choice["finish_reason"] == "length"


def test_calls_written_whole_before_a_cut_still_count_once():
    """A small model allowed several calls may repeat one until max_tokens: the whole calls
    before the cut are the answer, a repeated one said once."""
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    cut = '{"tool_calls": [' + call + ", " + call + ', {"name": "get_wea'
    plan = emulate(chat_body(tool_choice="required", parallel_tool_calls=True))
    choice = ChatCompletion.model_validate(plan.answer(engine_answer(cut, finish_reason="length"))).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [made] = choice.message.tool_calls
    assert made.function.name == "get_weather" and json.loads(made.function.arguments) == {"city": "Paris"}
    sent = flat(translate(plan, engine_chunks(cut, finish_reason="length")))
    assert [c["choices"][0]["finish_reason"] for c in sent if c["choices"] and c["choices"][0].get("finish_reason")] == ["tool_calls"]


def test_answer_reads_every_choice():
    text_reply = '{"response": "Let me check."}'
    chat = emulate(chat_body(n=2), 64).answer(engine_answer(CALL_REPLY, text_reply))
    first, second = ChatCompletion.model_validate(chat).choices
    assert (first.index, first.finish_reason) == (0, "tool_calls")
    assert first.message.tool_calls[0].function.name == "get_weather"
    assert (second.index, second.finish_reason, second.message.content) == (1, "stop", "Let me check.")


# --- streams -----------------------------------------------------------------------


def engine_chunks(pieces: list[str], finish_reason: str = "stop", choices: int = 1) -> list[dict]:
    """llama-server's stream (as recorded from it): a role chunk, one chunk per piece of
    content, a finish chunk with an empty delta, then the usage chunk with no choices."""
    base = {"created": 1733000000, "id": "chatcmpl-xyz", "model": "smol", "system_fingerprint": "b1-0c1e570",
            "object": "chat.completion.chunk"}

    def chunk(index, delta, reason=None):
        return {"choices": [{"finish_reason": reason, "index": index, "delta": delta}], **base}

    out = [chunk(i, {"role": "assistant", "content": None}) for i in range(choices)]
    out += [chunk(i, {"content": piece}) for piece in pieces for i in range(choices)]
    out += [chunk(i, {}, finish_reason) for i in range(choices)]
    out.append({"choices": [], **base, "usage": {"completion_tokens": 38, "prompt_tokens": 200, "total_tokens": 238},
                "timings": {"predicted_n": 38}})
    return out


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def translate(plan, chunks: list[dict]) -> list[list[dict]]:
    """What the stream sends after each engine chunk, then at its end."""
    stream = plan.stream()
    return [stream.feed(chunk) for chunk in chunks] + [stream.finish()]


def flat(steps: list[list[dict]]) -> list[dict]:
    return [chunk for step in steps for chunk in step]


def test_stream_of_a_tool_call():
    engine = engine_chunks(pieces(CALL_REPLY))
    steps = translate(forced_plan(), engine)
    role_delta = {"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}
    assert steps[0] == [{**{k: v for k, v in engine[0].items() if k != "choices"}, "choices": [role_delta]}]
    assert not flat(steps[1:-3])  # the JSON reply is held back
    sent = flat(steps)
    chunks = [ChatCompletionChunk.model_validate(chunk) for chunk in sent]
    assert all((c.id, c.model, c.created, c.object) == ("chatcmpl-xyz", "smol", 1733000000, "chat.completion.chunk")
               for c in chunks)
    role, call, last, usage = chunks
    [delta] = call.choices[0].delta.tool_calls
    assert (delta.index, delta.type, delta.function.name) == (0, "function", "get_weather") and CALL_ID.match(delta.id)
    assert json.loads(delta.function.arguments) == {"city": "Paris"}
    assert last.choices[0].finish_reason == "tool_calls" and last.choices[0].delta.content is None
    assert sent[-1] == engine[-1] and usage.usage.completion_tokens == 38  # unchanged, last


def test_stream_of_a_text_answer_is_incremental():
    text = 'Il fait "beau" \\ à Paris \U0001f600\n'
    reply = json.dumps({"response": text})  # escapes: \" \\ \u00e0 \ud83d\ude00 \n
    steps = translate(emulate(chat_body(), 64), engine_chunks(list(reply)))  # one character at a time
    deltas = [c["choices"][0]["delta"].get("content") for step in steps[:-2] for c in step]
    streamed = [d for d in deltas if d]
    assert len(streamed) > 5 and "".join(streamed) == text  # text went out before the reply finished
    sent = flat(steps)
    assert [ChatCompletionChunk.model_validate(c).choices[0].finish_reason for c in sent[:-1]][-1] == "stop"
    assert sent[0]["choices"][0]["delta"]["role"] == "assistant"


def test_stream_cut_off_and_several_choices():
    cut = pieces(CALL_REPLY)[:5]
    sent = flat(translate(forced_plan(), engine_chunks(cut, finish_reason="length")))
    ends = [c for c in sent if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in ends] == ["length"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sent if c["choices"]) == "".join(cut)
    # n=2: each choice is read on its own; usage waits for both.
    sent = flat(translate(forced_plan(n=2), engine_chunks(pieces(CALL_REPLY), choices=2)))
    for index in (0, 1):
        mine = [c["choices"][0] for c in sent if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "tool_calls"
        assert mine[1]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[-1]["usage"]["total_tokens"] == 238


def test_stream_that_ends_without_a_finish_reason():
    engine = engine_chunks(pieces(CALL_REPLY)[:4])
    stream = forced_plan().stream()
    for chunk in engine[:-2]:  # neither the finish chunk nor usage
        stream.feed(chunk)
    text, last = stream.finish()
    assert text["choices"][0]["delta"]["content"] == "".join(pieces(CALL_REPLY)[:4])
    assert last["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("reply", [
    json.dumps("plain ascii"), json.dumps('q"uo\\te/s\b\f\n\r\t'), json.dumps("é\u263c\U0001f600", ensure_ascii=True),
    json.dumps("é\u263c\U0001f600", ensure_ascii=False), '"lone \\ud83d high"', '"lone \\ude00 low"', '"\\/"',
])
def test_json_strings_decode_across_every_split(reply):
    expected = "".join(ch if not 0xD800 <= ord(ch) <= 0xDFFF else "\ufffd" for ch in json.loads(reply))
    body = reply[1:]  # after the opening quote
    for cut in range(len(body) + 1):
        decoder = _JsonString()
        assert decoder.feed(body[:cut]) + decoder.feed(body[cut:]) == expected
        assert decoder.done
    decoder = _JsonString()
    assert "".join(decoder.feed(ch) for ch in body) == expected and decoder.done


# --- the real openai SDK, from a loopback server that does what the gateway will ----


class Gateway(ThreadingHTTPServer):
    """Emulates tool calling in front of an `engine`: a callable that takes the rewritten
    body and returns the chat completion, or (streaming) an iterable of chunk payloads.
    Keeps what it sent in `sent` (the answer, or the list of chunks)."""

    daemon_threads = True

    def __init__(self, engine):
        super().__init__(("127.0.0.1", 0), _GatewayHandler)
        self.engine = engine
        self.sent = None
        self.engine_bodies: list[dict] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.server_address[1]}/v1", api_key="x", max_retries=0,
                             timeout=300)


class _GatewayHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            plan = emulate(body, 64)
        except InvalidRequest as error:
            return self._send(400, {"error": {"message": error.message, "type": error.type, "param": error.param,
                                              "code": error.code}})
        self.server.engine_bodies.append(copy.deepcopy(body))
        if not body.get("stream"):
            answer = self.server.engine(body)
            self.server.sent = plan.answer(answer) if plan else answer
            return self._send(200, self.server.sent)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        stream = plan.stream() if plan else None
        self.server.sent = []
        for payload in self.server.engine(body):
            self._events(stream.feed(payload) if stream else [payload])
        self._events(stream.finish() if stream else [])
        self.wfile.write(b"data: [DONE]\n\n")

    def _events(self, chunks):
        for chunk in chunks:
            self.server.sent.append(chunk)
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def strict(tool: dict) -> dict:
    """The SDK parses the arguments of strict tools only."""
    return {"type": "function", "function": {**tool["function"], "strict": True}}


@contextlib.contextmanager
def recorded_gateway(answer: dict | None = None, chunks: list[dict] | None = None):
    gateway = Gateway(lambda body: chunks if body.get("stream") else answer)
    try:
        yield gateway
    finally:
        gateway.shutdown()
        gateway.server_close()


def test_sdk_reads_the_answer_and_the_refusal():
    with recorded_gateway(answer=engine_answer(CALL_REPLY)) as gateway:
        completion = gateway.client.chat.completions.create(model="smol", messages=[SYSTEM, QUESTION], tools=TOOLS,
                                                            tool_choice="required")
        [call] = completion.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        with pytest.raises(openai.BadRequestError) as error:
            gateway.client.chat.completions.create(model="smol", messages=[QUESTION], tools=TOOLS,
                                                   tool_choice={"type": "function", "function": {"name": "nope"}})
        assert error.value.body["param"] == "tool_choice.function.name"


def test_sdk_accumulates_the_streamed_tool_call():
    with recorded_gateway(chunks=engine_chunks(pieces(CALL_REPLY))) as gateway:
        with gateway.client.chat.completions.stream(model="smol", messages=[SYSTEM, QUESTION],
                                                    tools=[strict(t) for t in TOOLS], tool_choice="required",
                                                    stream_options={"include_usage": True}) as stream:
            events = [event.type for event in stream]
            final = stream.get_final_completion()
        assert "tool_calls.function.arguments.done" in events
        choice = final.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.function.parsed_arguments == {"city": "Paris"}
        assert final.usage.total_tokens == 238
        texts = [c.choices[0].delta.content for c in gateway.client.chat.completions.create(
            model="smol", messages=[QUESTION], tools=TOOLS, stream=True) if c.choices and c.choices[0].delta.content]
        assert texts == []


def test_sdk_accumulates_a_streamed_text_answer():
    reply = json.dumps({"response": 'Sunny, "21 C".'})
    with recorded_gateway(chunks=engine_chunks(pieces(reply, 2))) as gateway:
        with gateway.client.chat.completions.stream(model="smol", messages=[QUESTION],
                                                    tools=[strict(t) for t in TOOLS]) as stream:
            final = stream.get_final_completion()
    assert final.choices[0].message.content == 'Sunny, "21 C".' and final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls


# --- the real engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The engine as the appliance starts it, with the default model (no tools in its chat template)."""
    model = msgspec.structs.replace(load_profile("edge-cpu").models[0], max_num_seqs=2, embeddings=False, gpu_layers=0)
    with running_engine(model, tmp_path_factory.mktemp("engine")) as (command, _):
        url, headers = command.base_url.removesuffix("/v1"), {"Authorization": "Bearer test-key"}
        caps = httpx.get(f"{url}/props", headers=headers, timeout=10).json().get("chat_template_caps") or {}
        assert caps.get("supports_tools") is False, caps  # what this emulation is for
        with httpx.Client(base_url=url, headers=headers, timeout=300) as http:

            def answer(body: dict):
                if not body.get("stream"):
                    response = http.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    return response.json()
                return _stream(http, body)

            gateway = Gateway(answer)
            yield gateway
            gateway.shutdown()
            gateway.server_close()


def _stream(http: httpx.Client, body: dict):
    body = {**body, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def ask(gateway: Gateway, **fields):
    raw = gateway.client.chat.completions.with_raw_response.create(
        model="smol", messages=[SYSTEM, QUESTION], tools=TOOLS, temperature=0, **fields)
    completion = ChatCompletion.model_validate(raw.http_response.json())
    assert completion.usage.completion_tokens <= gateway.engine_bodies[-1]["max_tokens"]
    return completion


def assert_valid_call(call, names=("get_weather", "get_time")):
    assert CALL_ID.match(call.id) and call.type == "function" and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_engine_required_calls_a_tool(engine):
    choice = ask(engine, tool_choice="required", max_tokens=60).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert_valid_call(call)


def test_engine_named_function_calls_exactly_it(engine):
    choice = ask(engine, tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60).choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert_valid_call(call, names=("get_time",))


def test_engine_forced_call_stays_within_max_tokens(engine):
    completion = ask(engine, tool_choice="required", max_tokens=20)
    assert completion.usage.completion_tokens <= 20
    choice = completion.choices[0]
    if choice.finish_reason == "tool_calls":  # it fit
        [call] = choice.message.tool_calls
        assert_valid_call(call)
    else:
        assert choice.finish_reason == "length" and choice.message.content and not choice.message.tool_calls


def test_engine_auto_answers(engine):
    choice = ask(engine, max_tokens=48).choices[0]  # the default: auto
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert_valid_call(call)
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_engine_streamed_call(engine, tool_choice):
    with engine.client.chat.completions.stream(model="smol", messages=[SYSTEM, QUESTION],
                                               tools=[strict(t) for t in TOOLS], tool_choice=tool_choice,
                                               temperature=0, max_tokens=60,
                                               stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()
    chunks = [ChatCompletionChunk.model_validate(chunk) for chunk in engine.sent]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens <= 60
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert_valid_call(call, names=("get_weather",) if isinstance(tool_choice, dict) else ("get_weather", "get_time"))
    assert call.function.parsed_arguments == json.loads(call.function.arguments)
