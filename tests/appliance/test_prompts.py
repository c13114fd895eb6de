"""Rendering prompt templates: the sandbox, variables checked against their declarations,
and the draw between versions by weight."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from appliance.errors import InvalidRequest
from appliance.prompts import Template


def version(system: str, variables: list[dict]) -> dict:
    return {"system": system, "user": None,
            "variables": [{"type": "string", "required": True, "default": None, "description": None, **v}
                          for v in variables]}


def test_variables_are_checked_against_their_declarations():
    t = Template("t", {1: version("{{ n }} x {{ word }} {{ flag }}", [
        {"name": "n", "type": "integer"}, {"name": "word", "default": "hi"}, {"name": "flag", "type": "boolean",
                                                                               "required": False}])}, {})
    assert t.render(1, {"n": 3}) == {"system": "3 x hi None"}
    assert t.render(1, {"n": 3, "word": "안녕", "flag": True}) == {"system": "3 x 안녕 True"}
    for given, param in [({}, "template.variables.n"), ({"n": True}, "template.variables.n"),
                         ({"n": "3"}, "template.variables.n"), ({"n": 1, "other": 2}, "template.variables.other")]:
        with pytest.raises(InvalidRequest) as refused:
            t.render(1, given)
        assert refused.value.param == param, given


def test_the_sandbox_refuses_what_a_template_should_not_reach():
    t = Template("t", {1: version("{{ x.__class__.__mro__ }}", [{"name": "x"}]),
                       2: version("{% for i in range(10**7) %}xxxxxxxx{% endfor %}", [])}, {})
    with pytest.raises(InvalidRequest, match="could not be rendered"):
        t.render(1, {"x": "s"})
    with pytest.raises(InvalidRequest, match="rendered more than|could not be rendered"):
        t.render(2, {})


def test_versions_are_drawn_by_weight_and_an_asked_version_is_kept():
    t = Template("t", {1: version("one", []), 2: version("two", []), 3: version("three", [])}, {"1": 3, "2": 1})
    rng = random.Random(7)
    drawn = Counter(t.choose(None, rng) for _ in range(4000))
    assert set(drawn) == {1, 2} and 0.7 < drawn[1] / 4000 < 0.8  # 3 to 1
    assert t.choose(3, random.Random(7)) == 3
    assert Template("t", {1: version("a", []), 2: version("b", [])}, {}).choose(None, random.Random()) == 2  # latest
    with pytest.raises(InvalidRequest) as refused:
        t.choose(9, random.Random())
    assert refused.value.param == "template.version"
