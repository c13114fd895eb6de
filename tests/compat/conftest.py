"""Shared pieces of the compatibility suite: real client libraries (the openai SDK,
LangChain, pydantic-ai) driving the real stack (tests/conftest.py's session `stack`: the
appliance with llama.cpp and the default model).

The default model is tiny: its content is asserted only for the Paris question (with the
plain system prompt, at temperature 0); everything else is checked for shape, types and
schema validity."""

from __future__ import annotations

import copy

import jsonschema
from pydantic import BaseModel

from tests.conftest import DEFAULT_MODEL, QUESTION, SYSTEM
from tests.functions import PARAMETERS, TIME, TOOLS, WEATHER

__all__ = ["DEFAULT_MODEL", "SYSTEM", "QUESTION", "FRANCE", "Capital", "WEATHER", "TIME", "TOOLS", "PARAMETERS", "WEATHER_QUESTION",
           "valid_arguments", "strict"]

FRANCE = [SYSTEM, QUESTION]


class Capital(BaseModel):
    city: str
    country: str


WEATHER_QUESTION = {"role": "user", "content": "What is the weather in Paris?"}


def strict(tool: dict) -> dict:
    """The tool marked strict (the SDK's parse/stream helpers only accept strict function tools)."""
    tool = copy.deepcopy(tool)
    tool["function"]["strict"] = True
    return tool


def valid_arguments(name: str, arguments) -> dict:
    """`arguments` (a JSON string or a dict) validated against the named tool's parameters."""
    import json

    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.Draft202012Validator(PARAMETERS[name]).validate(value)
    return value
