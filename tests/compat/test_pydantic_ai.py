"""pydantic-ai (OpenAIChatModel over the openai SDK) against the real stack: a plain agent,
and an agent whose structured output comes from a forced tool call."""

from __future__ import annotations

import openai
import pytest

from tests.compat.conftest import DEFAULT_MODEL, QUESTION, SYSTEM, Capital

pytestmark = pytest.mark.stack


def agent(stack, **kwargs):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    # Our own client, so that an error from the gateway is not hidden behind SDK retries.
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.admin_key, max_retries=0, timeout=60)
    model = OpenAIChatModel(DEFAULT_MODEL, provider=OpenAIProvider(openai_client=client))
    # retries=0: a reply that does not validate fails the test instead of being retried.
    return Agent(model, system_prompt=SYSTEM["content"], retries=0, **kwargs)


def test_agent_answers_paris(stack):
    result = agent(stack, model_settings={"temperature": 0, "max_tokens": 30}).run_sync(QUESTION["content"])
    assert isinstance(result.output, str) and "Paris" in result.output
    usage = result.usage
    assert usage.requests == 1 and usage.input_tokens > 0 and usage.output_tokens > 0


def test_agent_with_structured_output(stack):
    result = agent(stack, output_type=Capital, model_settings={"temperature": 0, "max_tokens": 64}).run_sync(
        "What is the capital of France? Give the city and the country.")
    assert isinstance(result.output, Capital), result.output
    assert isinstance(result.output.city, str) and isinstance(result.output.country, str)
    assert result.usage.requests == 1, "the first forced tool call already validated"
