"""The official openai SDK (v3) against the real stack: Chat Completions (plain, streamed,
structured output via `parse`, JSON mode, tools, limits, `n`, content parts, errors) and
the Responses API (plain, streamed, `parse`, function tools, refused stateful fields)."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.compat.conftest import (
    DEFAULT_MODEL, FRANCE, QUESTION, SYSTEM, TIME, TOOLS, WEATHER, WEATHER_QUESTION, Capital, strict,
    valid_arguments,
)
from tests.gateway.test_admin_keys import api, wait_status

pytestmark = pytest.mark.stack

CAPITAL_QUESTION = {"role": "user", "content": "What is the capital of France? Give the city and the country."}


def only_choice(answer: ChatCompletion):
    assert len(answer.choices) == 1 and answer.choices[0].index == 0
    return answer.choices[0]


# --- Chat Completions ---------------------------------------------------------------


def test_chat_completion_answers_paris(stack):
    answer = stack.client().chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    choice = only_choice(answer)
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert answer.object == "chat.completion" and answer.model == DEFAULT_MODEL and answer.id
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_stream_deltas_join_and_one_usage_chunk_ends_it(stack):
    chunks = list(stack.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=FRANCE, temperature=0, max_tokens=30, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1], "exactly one usage chunk, the last"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons in (["stop"], ["length"])


def test_parse_with_a_pydantic_model(stack):
    """`response_format=<BaseModel>`: the SDK sends a strict json_schema and parses the reply."""
    answer = stack.client().chat.completions.parse(
        model=DEFAULT_MODEL, messages=[SYSTEM, CAPITAL_QUESTION], response_format=Capital, temperature=0,
        max_tokens=64)
    message = only_choice(answer).message
    assert isinstance(message.parsed, Capital), message
    assert Capital.model_validate_json(message.content) == message.parsed
    assert message.refusal is None


def test_json_object_mode_returns_json(stack):
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL, temperature=0, max_tokens=64, response_format={"type": "json_object"},
        messages=[SYSTEM, CAPITAL_QUESTION])
    choice = only_choice(answer)
    assert choice.finish_reason == "stop", f"the JSON should close within 64 tokens: {choice.message.content!r}"
    assert isinstance(json.loads(choice.message.content), dict)


def test_tool_choice_required_calls_one_of_the_tools(stack):
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[SYSTEM, WEATHER_QUESTION], tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=64)
    choice = only_choice(answer)
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id
        valid_arguments(call.function.name, call.function.arguments)


def test_named_tool_choice_calls_exactly_that_function(stack):
    """The weather question, but the choice names get_time: the call must be get_time."""
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[SYSTEM, WEATHER_QUESTION], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=64)
    choice = only_choice(answer)
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time", calls
    assert isinstance(valid_arguments("get_time", calls[0].function.arguments)["tz"], str)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "pii_responses"])
def test_streamed_named_tool_call_accumulates_with_the_sdk_helper(stack, masked):
    """`chat.completions.stream(...)` accumulates the tool-call deltas the way the SDK does; under
    pii_responses the arguments are held and come whole before the finish, to the same result."""
    key = None
    if masked:
        answer = api(stack).post("/admin/keys", json={"name": "sdk-masked", "pii": {"phone": "mask"}, "pii_responses": True})
        assert answer.status_code == 201, answer.text
        key = answer.json()["key"]
        assert wait_status(stack, key, 200).status_code == 200
    client = stack.client(key)
    events = []
    with client.chat.completions.stream(
        model=DEFAULT_MODEL, messages=[SYSTEM, WEATHER_QUESTION], tools=[strict(WEATHER), strict(TIME)],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=64,
        stream_options={"include_usage": True},
    ) as stream:
        for event in stream:
            events.append(event)
        final = stream.get_final_completion()
    choice = only_choice(final)
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id
    arguments = valid_arguments("get_weather", calls[0].function.arguments)
    assert calls[0].function.parsed_arguments == arguments
    kinds = [e.type for e in events]
    assert "tool_calls.function.arguments.delta" in kinds and "tool_calls.function.arguments.done" in kinds
    assert "".join(e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta") \
        == calls[0].function.arguments
    assert final.usage is not None and final.usage.completion_tokens > 0


def test_forced_tool_call_with_a_small_max_tokens_finishes(stack):
    started = time.monotonic()
    answer = stack.client(timeout=60).chat.completions.create(
        model=DEFAULT_MODEL, messages=[SYSTEM, WEATHER_QUESTION], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=16)
    elapsed = time.monotonic() - started
    choice = only_choice(answer)
    assert answer.usage.completion_tokens <= 16
    assert elapsed < 30, f"16 tokens took {elapsed:.1f} s"
    if choice.finish_reason == "tool_calls":  # it fit
        valid_arguments("get_weather", choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.finish_reason == "length" and not choice.message.tool_calls, choice


def test_max_completion_tokens_bounds_the_answer(stack):
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=FRANCE, temperature=0, max_completion_tokens=5)
    choice = only_choice(answer)
    assert 0 < answer.usage.completion_tokens <= 5
    assert choice.finish_reason == "length", "the Paris answer is longer than 5 tokens"


def test_n_returns_several_choices_and_counts_them_all(stack):
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL, n=2, temperature=1.0, max_tokens=8,
        messages=[SYSTEM, {"role": "user", "content": "Tell me a long story about a dragon."}])
    assert sorted(c.index for c in answer.choices) == [0, 1]
    assert all(c.message.content for c in answer.choices)
    usage = answer.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    cut = sum(c.finish_reason == "length" for c in answer.choices)  # each of these has exactly 8 tokens
    assert 8 * cut + (2 - cut) <= usage.completion_tokens <= 16, "both choices' tokens are counted"
    if cut == 2:
        assert usage.completion_tokens == 16


def test_n_above_eight_is_refused_naming_n(stack):
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, n=9, max_tokens=4)
    assert caught.value.status_code == 400
    assert caught.value.param == "n", caught.value.body


def test_developer_message_works_as_a_system_prompt(stack):
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL, temperature=0, max_tokens=30,
        messages=[{"role": "developer", "content": SYSTEM["content"]}, QUESTION])
    assert "Paris" in only_choice(answer).message.content


def test_content_as_a_list_of_text_parts(stack):
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL, temperature=0, max_tokens=30,
        messages=[{"role": "system", "content": [{"type": "text", "text": SYSTEM["content"]}]},
                  {"role": "user", "content": [{"type": "text", "text": QUESTION["content"]}]}])
    assert "Paris" in only_choice(answer).message.content


def test_an_image_part_is_refused_naming_its_type(stack):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(
            model=DEFAULT_MODEL, max_tokens=4,
            messages=[SYSTEM, {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert caught.value.param == "messages[1].content[1].type", caught.value.body


def test_same_seed_same_sampled_answer(stack):
    ask = dict(model=DEFAULT_MODEL, messages=[SYSTEM, {"role": "user", "content": "Write a short poem about the sea."}],
               temperature=0.8, seed=1234, max_tokens=24)
    first, second = (only_choice(stack.client().chat.completions.create(**ask)).message.content for _ in range(2))
    assert first == second
    other = only_choice(stack.client().chat.completions.create(**{**ask, "seed": 7})).message.content
    assert other != first, "another seed samples another answer (so the answer is sampled, not greedy)"


# --- Responses API ------------------------------------------------------------------


def test_responses_create_answers_paris(stack):
    response = stack.client().responses.create(
        model=DEFAULT_MODEL, input=QUESTION["content"], instructions=SYSTEM["content"], temperature=0,
        max_output_tokens=30)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert "Paris" in response.output_text
    assert response.output and response.output[0].type == "message"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_responses_max_output_tokens_bounds_the_answer(stack):
    # Sent on as max_completion_tokens, which OpenAI's reasoning models require and llama.cpp reads.
    response = stack.client().responses.create(
        model=DEFAULT_MODEL, input=QUESTION["content"], instructions=SYSTEM["content"], max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_responses_stream_events_in_order(stack):
    events = list(stack.client().responses.create(
        model=DEFAULT_MODEL, input=QUESTION["content"], instructions=SYSTEM["content"], temperature=0,
        max_output_tokens=30, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    order = ["response.created", "response.output_item.added", "response.content_part.added",
             "response.output_text.delta", "response.output_text.done", "response.content_part.done",
             "response.output_item.done", "response.completed"]
    positions = [kinds.index(kind) for kind in order]
    assert positions == sorted(positions), kinds
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert "Paris" in text and text == final.output_text
    assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_responses_parse_with_a_pydantic_model(stack):
    response = stack.client().responses.parse(
        model=DEFAULT_MODEL, input=CAPITAL_QUESTION["content"], instructions=SYSTEM["content"], text_format=Capital,
        temperature=0, max_output_tokens=64)
    assert isinstance(response.output_parsed, Capital), response.output_text


def responses_weather_call(stack, **fields):
    function = WEATHER["function"]
    return stack.client().responses.create(
        model=DEFAULT_MODEL, input=WEATHER_QUESTION["content"], instructions=SYSTEM["content"], tool_choice="required",
        tools=[{"type": "function", "name": function["name"], "description": function["description"],
                "parameters": function["parameters"], "strict": True}],
        temperature=0, max_output_tokens=64, **fields)


def assert_weather_calls(response, count: int | None = None):
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    assert count is None or len(calls) == count, calls
    for call in calls:
        assert call.name == "get_weather" and call.call_id and call.status == "completed"
        valid_arguments("get_weather", call.arguments)


def test_responses_function_tool_required(stack):
    assert_weather_calls(responses_weather_call(stack, parallel_tool_calls=False), count=1)


def test_responses_function_tool_required_with_the_default_parallel_calls(stack):
    """The Responses API's default is parallel_tool_calls=true: a client that leaves it still gets calls."""
    assert_weather_calls(responses_weather_call(stack))


def test_responses_previous_response_id_is_refused(stack):
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().responses.create(model=DEFAULT_MODEL, input="And of Germany?", previous_response_id="resp_123")
    assert caught.value.param == "previous_response_id", caught.value.body
