"""The Responses API translated to and from Chat Completions (services/gateway/responses.py):
request bodies, answers and streams checked against the openai SDK's own types, then read
by the real SDK client from a loopback server that answers with the translation."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from appliance.errors import InvalidRequest
from services.gateway import schemas
from services.gateway.responses import ResponsesRequest, ResponseStream, from_chat, to_chat

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
RESPONSE_ID, CREATED = "resp_0123abcd", 1733000000
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}, "strict": True}


def request(**fields) -> ResponsesRequest:
    """A request as the gateway will decode it, from the client's JSON body."""
    return schemas.decode(json.dumps({"model": "qwen", "input": "Hi", **fields}).encode(), ResponsesRequest)


def assert_no_extras(value, where="$") -> None:
    """The SDK's models accept unknown fields; the translation must not send any."""
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"unexpected fields at {where}: {value.model_extra}"
        for name, field in value:
            assert_no_extras(field, f"{where}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_no_extras(item, f"{where}[{i}]")


def valid_response(data: dict) -> Response:
    response = Response.model_validate(data)
    assert_no_extras(response)
    return response


# --- requests ---------------------------------------------------------------------


def test_string_input_with_instructions():
    chat = to_chat(request(instructions="Answer briefly.", input="What is 2+2?"))
    assert chat == {"model": "qwen", "messages": [{"role": "system", "content": "Answer briefly."},
                                                  {"role": "user", "content": "What is 2+2?"}]}


def test_message_items_of_every_role_and_content_shape():
    chat = to_chat(request(input=[
        {"role": "developer", "content": "Be terse."},
        {"role": "system", "content": [{"type": "input_text", "text": "No emoji."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Line one"},
                                                         {"type": "input_text", "text": "Line two"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Noted.", "annotations": []}]},
        {"role": "user", "content": "Go on"},
    ]))
    assert chat["messages"] == [
        {"role": "system", "content": "Be terse."},  # developer: a role not every chat template knows
        {"role": "system", "content": "No emoji."},
        {"role": "user", "content": "Line one\nLine two"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Go on"},
    ]


def test_function_calls_and_outputs_replayed():
    """An answer's text and its calls become one assistant message; each output a tool message."""
    chat = to_chat(request(tools=[WEATHER_TOOL], input=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # dropped
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "21C"}]},
        {"type": "function_call", "call_id": "call_c", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
    ]))
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "21C"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        ]},
    ]


def test_function_tools_and_tool_choice():
    chat = to_chat(request(tools=[WEATHER_TOOL, {"type": "function", "name": "now"}], parallel_tool_calls=False))
    assert chat["tools"] == [
        {"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters", "strict")}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert chat["tool_choice"] == "auto" and chat["parallel_tool_calls"] is False
    assert to_chat(request(tools=[WEATHER_TOOL], tool_choice="required"))["tool_choice"] == "required"
    assert to_chat(request(tools=[WEATHER_TOOL]))["parallel_tool_calls"] is True  # the Responses default
    chosen = to_chat(request(tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"}))
    assert chosen["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "tools" not in to_chat(request(tool_choice="none"))


def test_text_formats():
    assert "response_format" not in to_chat(request(text={"format": {"type": "text"}}))
    assert to_chat(request(text={"format": {"type": "json_object"}}))["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    chat = to_chat(request(text={"format": {"type": "json_schema", "name": "count", "schema": schema, "strict": True},
                                 "verbosity": "low"}))
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}}


def test_sampling_settings_and_stream():
    chat = to_chat(request(max_output_tokens=64, temperature=0.2, top_p=0.9, seed=7, user="u1", stream=True,
                           store=True, metadata={"k": "v"}, reasoning={"effort": "low"}, truncation="auto",
                           include=["reasoning.encrypted_content"]))
    assert {k: v for k, v in chat.items() if k not in ("model", "messages")} == {
        "max_completion_tokens": 64, "temperature": 0.2, "top_p": 0.9, "seed": 7, "user": "u1",
        "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                             {"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]},
     "input[0].content[1].type"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "computer_call_output", "call_id": "c"}]}, "input[1].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].output[0].type"),
    ({"tools": [WEATHER_TOOL, {"type": "web_search"}]}, "tools[1].type"),
    ({"tools": [{"type": "function", "description": "no name"}]}, "tools[0].name"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice.name"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_refusals_name_the_parameter(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        to_chat(request(**fields))
    assert caught.value.param == param and caught.value.status == 400
    if "previous_response_id" in fields:
        assert "keeps no responses" in caught.value.message


@pytest.mark.parametrize("fields, param", [
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"input": [3]}, "input[0]"),
    ({"input": None}, "input"),
])
def test_malformed_fields_name_the_parameter(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        request(**fields)
    assert caught.value.param == param


# --- answers ----------------------------------------------------------------------

# A non-streamed answer as llama.cpp's server sends it.
LLAMA_ANSWER = {
    "choices": [{"finish_reason": "stop", "index": 0,
                 "message": {"role": "assistant", "content": "Four.", "reasoning_content": None}}],
    "created": CREATED, "model": "qwen", "system_fingerprint": "b5000-5f2a6a1c", "object": "chat.completion",
    "usage": {"completion_tokens": 3, "prompt_tokens": 19, "total_tokens": 22}, "id": "chatcmpl-6bXK0",
    "timings": {"prompt_n": 19, "prompt_ms": 21.4, "predicted_n": 3, "predicted_ms": 30.2},
}
LLAMA_TOOL_ANSWER = {**LLAMA_ANSWER, "choices": [{"finish_reason": "tool_calls", "index": 0, "message": {
    "role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "Pq3ZrbD1", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"type": "function", "id": "Vx8LmA02", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
    ]}}]}


def test_text_answer_is_a_valid_response():
    req = request(instructions="Be brief.", metadata={"team": "a"}, temperature=0.5)
    data = from_chat(LLAMA_ANSWER, req, RESPONSE_ID, CREATED)
    response = valid_response(data)
    assert "output_text" not in data
    assert response.id == RESPONSE_ID and response.status == "completed" and response.created_at == CREATED
    assert response.output_text == "Four."
    assert [(o.type, o.id, o.status) for o in response.output] == [("message", "msg_0123abcd", "completed")]
    assert response.usage.input_tokens == 19 and response.usage.output_tokens == 3 and response.usage.total_tokens == 22
    assert response.instructions == "Be brief." and response.metadata == {"team": "a"} and response.temperature == 0.5
    assert response.tool_choice == "auto" and response.tools == [] and response.parallel_tool_calls is True
    assert response.text.format.type == "text"


def test_tool_call_answer():
    req = request(tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"},
                  text={"format": {"type": "json_object"}})
    response = valid_response(from_chat(LLAMA_TOOL_ANSWER, req, RESPONSE_ID, CREATED))
    assert response.status == "completed" and response.output_text == ""
    assert [(o.type, o.id, o.call_id, o.name, o.arguments) for o in response.output] == [
        ("function_call", "fc_0123abcd_0", "Pq3ZrbD1", "get_weather", '{"city":"Paris"}'),
        ("function_call", "fc_0123abcd_1", "Vx8LmA02", "get_weather", '{"city":"Rome"}'),
    ]
    assert response.tools[0].name == "get_weather" and response.tool_choice.name == "get_weather"
    assert response.text.format.type == "json_object"


def test_length_cut_is_incomplete():
    cut = {**LLAMA_ANSWER, "choices": [{"finish_reason": "length", "index": 0,
                                        "message": {"role": "assistant", "content": "Once upon a"}}]}
    response = valid_response(from_chat(cut, request(max_output_tokens=3), RESPONSE_ID, CREATED))
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.output_text == "Once upon a"
    assert response.max_output_tokens == 3


# --- streams ----------------------------------------------------------------------


def llama_chunk(delta: dict | None = None, finish_reason=None, **extra) -> bytes:
    """One chat SSE data payload as llama.cpp's server writes it (usage chunks: choices [])."""
    choices = [] if delta is None else [{"finish_reason": finish_reason, "index": 0, "delta": delta}]
    return json.dumps({"choices": choices, "created": CREATED, "id": "chatcmpl-6bXK0", "model": "qwen",
                       "system_fingerprint": "b5000-5f2a6a1c", "object": "chat.completion.chunk", **extra},
                      separators=(",", ":")).encode()


USAGE = {"completion_tokens": 5, "prompt_tokens": 21, "total_tokens": 26}
TIMINGS = {"prompt_n": 21, "prompt_ms": 18.2, "predicted_n": 5, "predicted_ms": 40.1}
TEXT_STREAM = [
    llama_chunk({"role": "assistant", "content": None}),
    *(llama_chunk({"content": piece}) for piece in ("The", " sky", " is", " blue", ".")),
    llama_chunk({}, "stop", timings=TIMINGS),
    llama_chunk(usage=USAGE, timings=TIMINGS),
]
TOOL_STREAM = [
    llama_chunk({"role": "assistant", "content": None}),
    llama_chunk({"tool_calls": [{"index": 0, "id": "Pq3ZrbD1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}]}),
    *(llama_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
      for piece in ('{"ci', 'ty": "Pa', 'ris"}')),
    llama_chunk({"tool_calls": [{"index": 1, "id": "Vx8LmA02", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}),
    llama_chunk({}, "tool_calls"),
    llama_chunk(usage=USAGE),
]


def translate(chunks: list[bytes], req: ResponsesRequest | None = None) -> tuple[bytes, ResponseStream]:
    stream = ResponseStream(req or request(stream=True), RESPONSE_ID, CREATED)
    body = stream.start() + b"".join(stream.feed(chunk) for chunk in chunks) + stream.finish()
    return body, stream


def parse_events(body: bytes) -> list:
    """Every SSE event checked against the SDK's event union; its name must be its type."""
    events = []
    for raw in body.split(b"\n\n")[:-1]:
        name, data = raw.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        event = EVENT.validate_python(json.loads(data[6:]))
        assert_no_extras(event)
        assert event.type == name[7:].decode()
        events.append(event)
    assert body.endswith(b"\n\n")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_text_stream():
    body, stream = translate(TEXT_STREAM)
    events = parse_events(body)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 5, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert "".join(d.delta for d in deltas) == done.text == "The sky is blue."
    assert {(e.item_id, e.output_index, e.content_index) for e in [*deltas, done]} == {("msg_0123abcd", 0, 0)}
    completed = events[-1].response
    assert completed.status == "completed" and completed.output_text == "The sky is blue."
    assert completed.output[0].status == "completed" and completed.output[0].id == "msg_0123abcd"
    assert (completed.usage.input_tokens, completed.usage.output_tokens, completed.usage.total_tokens) == (21, 5, 26)


def test_tool_call_stream():
    body, _ = translate(TOOL_STREAM, request(stream=True, tools=[WEATHER_TOOL]))
    events = parse_events(body)
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.call_id, e.item.name, e.item.status) for e in added] == [
        (0, "Pq3ZrbD1", "get_weather", "in_progress"), (1, "Vx8LmA02", "get_weather", "in_progress")]
    for index, arguments in enumerate(['{"city": "Paris"}', '{"city": "Rome"}']):
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta" and e.output_index == index]
        done = [e for e in events if e.type == "response.function_call_arguments.done" and e.output_index == index]
        assert "".join(deltas) == done[0].arguments == arguments
    completed = events[-1].response
    assert events[-1].type == "response.completed" and completed.output_text == ""
    assert [(o.id, o.call_id, o.arguments, o.status) for o in completed.output] == [
        ("fc_0123abcd_0", "Pq3ZrbD1", '{"city": "Paris"}', "completed"),
        ("fc_0123abcd_1", "Vx8LmA02", '{"city": "Rome"}', "completed")]


def test_tool_call_announced_once_its_name_is_whole():
    """llama.cpp resends a call's id and whole name while the name grows; a call may have no arguments."""
    def call(index, **fields):
        return llama_chunk({"tool_calls": [{"index": index, **fields}]})

    chunks = [
        TOOL_STREAM[0],
        call(0, id="A1", type="function", function={"name": "get_"}),
        call(0, id="A1", type="function", function={"name": "get_weather"}),
        call(0, function={"arguments": '{"city": "Oslo"}'}),
        call(1, id="B2", type="function", function={"name": "now"}),
        llama_chunk({}, "tool_calls"), llama_chunk(usage=USAGE),
    ]
    events = parse_events(translate(chunks)[0])
    added = [(e.output_index, e.item.call_id, e.item.name) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, "A1", "get_weather"), (1, "B2", "now")]
    assert [(o.call_id, o.name, o.arguments) for o in events[-1].response.output] == [
        ("A1", "get_weather", '{"city": "Oslo"}'), ("B2", "now", "")]


def test_text_then_tool_call_stream():
    chunks = [TOOL_STREAM[0], llama_chunk({"content": "Let me check."}), *TOOL_STREAM[1:]]
    completed = parse_events(translate(chunks)[0])[-1].response
    assert [o.type for o in completed.output] == ["message", "function_call", "function_call"]
    assert completed.output_text == "Let me check." and completed.output[1].id == "fc_0123abcd_1"


def test_stream_cut_at_max_tokens_is_incomplete():
    chunks = [*TEXT_STREAM[:3], llama_chunk({}, "length"), TEXT_STREAM[-1]]
    events = parse_events(translate(chunks)[0])
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output[0].status == "incomplete" and events[-1].response.output_text == "The sky"


def test_broken_stream_fails():
    stream = ResponseStream(request(stream=True), RESPONSE_ID, CREATED)
    body = stream.start() + stream.feed(TEXT_STREAM[1])
    body += stream.feed(json.dumps({"error": {"message": "engine crashed", "type": "engine_error"}}).encode())
    assert stream.finish() == b"" and stream.fail("again") == b""
    events = parse_events(body)
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].message == "engine crashed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.message == "engine crashed" and failed.output_text == "The"
    assert failed.usage is None


# --- the real SDK against a loopback server answering with the translation --------------


class CannedEngine(ThreadingHTTPServer):
    """Answers POST /v1/responses by translating a canned chat answer (or stream)."""

    answer: dict = LLAMA_ANSWER
    chunks: list[bytes] = TEXT_STREAM
    chat: dict | None = None  # what would have gone to the engine


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        server: CannedEngine = self.server
        assert self.path == "/v1/responses"
        req = schemas.decode(self.rfile.read(int(self.headers["content-length"])), ResponsesRequest)
        server.chat = to_chat(req)
        if req.stream:
            body, kind = translate(server.chunks, req)[0], "text/event-stream"
        else:
            body, kind = msgspec.json.encode(from_chat(server.answer, req, RESPONSE_ID, CREATED)), "application/json"
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def engine():
    server = CannedEngine(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(engine):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{engine.server_port}/v1", api_key="x", max_retries=0)


def test_sdk_create(client, engine):
    response = client.responses.create(model="qwen", input="What is 2+2?", instructions="Be brief.")
    assert response.output_text == "Four." and response.usage.output_tokens == 3
    assert engine.chat["messages"][0] == {"role": "system", "content": "Be brief."}


def test_sdk_create_stream(client, engine):
    events = list(client.responses.create(model="qwen", input="Colour of the sky?", stream=True))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "The sky is blue."
    assert engine.chat["stream_options"] == {"include_usage": True}


def test_sdk_stream_helper(client):
    with client.responses.stream(model="qwen", input="Colour of the sky?") as stream:
        texts = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert texts[-1] == "The sky is blue." and final.output_text == "The sky is blue."
    assert final.usage.total_tokens == 26


def test_sdk_stream_tool_calls(client, engine):
    engine.chunks = TOOL_STREAM
    with client.responses.stream(model="qwen", input="Weather in Paris and Rome?", tools=[WEATHER_TOOL]) as stream:
        final = stream.get_final_response()
    assert [(o.call_id, o.parsed_arguments) for o in final.output] == [("Pq3ZrbD1", {"city": "Paris"}),
                                                                      ("Vx8LmA02", {"city": "Rome"})]
    assert engine.chat["tools"][0]["function"]["name"] == "get_weather"


def test_sdk_parse_structured_output(client, engine):
    class Weather(pydantic.BaseModel):
        city: str
        celsius: int

    engine.answer = {**LLAMA_ANSWER, "choices": [{"finish_reason": "stop", "index": 0, "message": {
        "role": "assistant", "content": '{"city": "Paris", "celsius": 18}'}}]}
    parsed = client.responses.parse(model="qwen", input="Weather in Paris?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", celsius=18)
    assert engine.chat["response_format"]["type"] == "json_schema"
    assert engine.chat["response_format"]["json_schema"]["name"] == "Weather"
