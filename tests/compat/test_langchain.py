"""LangChain's ChatOpenAI (langchain-openai) against the real stack: invoke, stream, tool
binding with a forced choice, and structured output by function calling and by JSON
schema."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.tools import tool

from tests.compat.conftest import DEFAULT_MODEL, QUESTION, SYSTEM, Capital

pytestmark = pytest.mark.stack

FRANCE = [SystemMessage(SYSTEM["content"]), HumanMessage(QUESTION["content"])]
CAPITAL = [SystemMessage(SYSTEM["content"]),
           HumanMessage("What is the capital of France? Give the city and the country.")]


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


def chat(stack, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=stack.base_url, api_key=stack.admin_key, model=DEFAULT_MODEL, temperature=0,
                      max_retries=0, timeout=60, **{"max_tokens": 64, **kwargs})


def test_invoke_answers_paris(stack):
    message = chat(stack, max_tokens=30).invoke(FRANCE)
    assert isinstance(message, AIMessage) and "Paris" in message.content
    assert message.usage_metadata["input_tokens"] > 0 and message.usage_metadata["output_tokens"] > 0
    assert message.response_metadata["finish_reason"] in ("stop", "length")


def test_stream_chunks_join_to_the_answer(stack):
    chunks = list(chat(stack, max_tokens=30, stream_usage=True).stream(FRANCE))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert sum(1 for c in chunks if c.content) > 1, "the answer arrives in several chunks"
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert "Paris" in whole.content and whole.content == "".join(c.content for c in chunks)
    assert whole.usage_metadata["input_tokens"] > 0 and whole.usage_metadata["output_tokens"] > 0


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_bind_tools_with_a_forced_choice(stack, tool_choice):
    message = chat(stack).bind_tools([get_weather], tool_choice=tool_choice).invoke(
        [SystemMessage(SYSTEM["content"]), HumanMessage("What is the weather in Paris?")])
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"]
    assert isinstance(call["args"], dict) and isinstance(call["args"]["city"], str), call
    assert not message.invalid_tool_calls
    assert get_weather.invoke(call["args"]).startswith("It is sunny in")


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output(stack, method):
    capital = chat(stack).with_structured_output(Capital, method=method).invoke(CAPITAL)
    assert isinstance(capital, Capital), capital
    assert isinstance(capital.city, str) and isinstance(capital.country, str)


def test_structured_output_with_raw(stack):
    result = chat(stack).with_structured_output(Capital, method="json_schema", include_raw=True).invoke(CAPITAL)
    assert result["parsing_error"] is None, result
    assert isinstance(result["parsed"], Capital) and isinstance(result["raw"], AIMessage)
    assert Capital.model_validate_json(result["raw"].content) == result["parsed"]


def test_invoke_through_the_responses_api(stack):
    message = chat(stack, max_tokens=30, use_responses_api=True).invoke(FRANCE)
    assert "Paris" in message.text
    assert message.usage_metadata["input_tokens"] > 0
