"""No request can crash, hang or bloat the llama.cpp engine for everyone: engine-specific
fields are refused by name unless the profile allows them, OpenAI fields are bounded, and
whatever passes leaves the same engine process up and answering.

The inputs: what the probe of llama.cpp's server (commit 0c1e570) found costly or wrong
(a grammar like the one that crashed the old engine, n_probs / logprobs 1e9: every token's
probability at every step, dry_penalty_last_n 2^31: 20x slower, reasoning_format junk: a
500), then seeded random variants of their kind: every extension field the server reads
with junk values, and OpenAI fields past their bounds."""

from __future__ import annotations

import random

import httpx
import msgspec
import pytest

from appliance.config import GatewayConfig, ModelConfig
from appliance.errors import InvalidRequest
from services.gateway import engine_params
from services.gateway.schemas import ChatCompletionRequest
from services.stack import served_model
from tests.conftest import DEFAULT_MODEL, readiness

pytestmark = pytest.mark.stack

SEED = 20260
MESSAGES = [{"role": "user", "content": "Hi"}]

# llama.cpp's server reads these from a request body (tools/server/server-schema.cpp and
# server-common.cpp at 0c1e570), besides the OpenAI fields and the bounded extensions.
LLAMA_CPP_FIELDS = [
    "verbose", "timings_per_token", "cache_prompt", "return_tokens", "return_progress", "sse_ping_interval",
    "n_predict", "n_indent", "n_keep", "n_discard", "n_cmpl", "n_cache_reuse", "t_max_prompt_ms", "t_max_predict_ms",
    "response_fields", "top_n_sigma", "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "mirostat",
    "mirostat_tau", "mirostat_eta", "adaptive_target", "adaptive_decay", "n_probs", "min_keep", "backend_sampling",
    "post_sampling_probs", "lora", "json_schema", "grammar", "grammar_lazy", "grammar_type", "grammar_triggers",
    "preserved_tokens", "chat_format", "reasoning_format", "generation_prompt", "parse_tool_calls", "chat_parser",
    "continue_final_message", "reasoning_control", "reasoning_budget_tokens", "reasoning_budget_start_tag",
    "reasoning_budget_end_tags", "reasoning_budget_end_tag", "reasoning_budget_message", "thinking_budget_tokens",
    "samplers", "id_slot", "chat_template_kwargs", "add_generation_prompt", "input_extra",
    "add_special", "parse_special", "with_pieces", "id", "action", "thinking", "system", "tokens", "content",
]

# (endpoint, extra fields, the parameter a 400 must name): what the probe found, and its kin.
FOUND = [
    ("chat/completions", {"grammar": "root ::= ("}, "grammar"),
    ("chat/completions", {"grammar": "root ::= root"}, "grammar"),
    ("chat/completions", {"grammar": 'root ::= ("a"{1000}){1000}'}, "grammar"),
    ("chat/completions", {"json_schema": {"type": "string", "minLength": 100000000}}, "json_schema"),
    ("chat/completions", {"n_probs": 10**9}, "n_probs"),
    ("chat/completions", {"n_probs": 100000, "post_sampling_probs": True}, "n_probs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
    ("chat/completions", {"logprobs": 1000}, "logprobs"),
    ("completions", {"logprobs": 10**6}, "logprobs"),
    ("chat/completions", {"dry_multiplier": 1e30, "dry_penalty_last_n": 2**31 - 1}, "dry_multiplier"),
    ("chat/completions", {"repeat_last_n": 2**31 - 1, "repeat_penalty": 1.5}, "repeat_last_n"),
    ("chat/completions", {"reasoning_format": "junk"}, "reasoning_format"),
    ("chat/completions", {"samplers": ["temperature"] * 10000}, "samplers"),
    ("chat/completions", {"sse_ping_interval": 0, "stream": True}, "sse_ping_interval"),
    ("chat/completions", {"mirostat": 2, "mirostat_tau": 1e30}, "mirostat"),
    ("chat/completions", {"id_slot": -(2**31)}, "id_slot"),
    ("chat/completions", {"lora": [{"id": 99, "scale": 1}]}, "lora"),
    ("chat/completions", {"n_keep": 2**31 - 1}, "n_keep"),
    ("chat/completions", {"max_tokens": 2**31}, "max_tokens"),
    ("chat/completions", {"temperature": 1e30}, "temperature"),
    ("chat/completions", {"top_k": 2**31 - 1}, "top_k"),
    ("chat/completions", {"min_p": -1}, "min_p"),
    ("chat/completions", {"typical_p": 1e30}, "typical_p"),
    ("chat/completions", {"repeat_penalty": 0}, "repeat_penalty"),
    ("chat/completions", {"logit_bias": {"abc": 100}}, "logit_bias"),
    ("chat/completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
    ("chat/completions", {"logit_bias": {"0": 1e30}}, "logit_bias[...]"),
    ("completions", {"n_indent": 2**31 - 1}, "n_indent"),
    ("embeddings", {"grammar": "root ::= ("}, "grammar"),
]

# Token ids the engine itself refuses (a 4xx): out of its vocabulary, negative, too many.
TOKEN_PROMPTS = [[999999999], [-1], [[1, 2], [99999999]], [1] * 100000, [2**31]]

# Harmless: the bounded extensions and OpenAI fields at their edges answer.
HARMLESS = [
    ("chat/completions", {"top_k": 1000, "min_p": 1, "typical_p": 0, "repeat_penalty": 2, "repeat_last_n": 4096}),
    ("chat/completions", {"logprobs": True, "top_logprobs": 20, "temperature": 2, "top_p": 0,
                          "presence_penalty": -2, "frequency_penalty": 2, "logit_bias": {"49151": -100, "0": 100}}),
    ("completions", {"logprobs": 20, "echo": True, "seed": -5}),
]


def junk(rng: random.Random):
    """A value of the kinds that broke engines: extreme numbers, long strings, deep or huge structures."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice([-(2**63), -(2**31), -1, 0, 2**31 - 1, 2**31, 2**63 - 1])
    if kind == 1:
        return rng.choice([1e308, -1e308, 1e-308, 0.5])
    if kind == 2:
        return rng.choice(["", "root ::= (", "(a+)+$", "x" * rng.randrange(1, 100000)])
    if kind == 3:
        return [rng.randrange(-(2**31), 2**31) for _ in range(rng.randrange(1, 1000))]
    if kind == 4:
        nested: dict = {}
        for _ in range(rng.randrange(1, 200)):
            nested = {"type": "object", "properties": {"a": nested}}
        return nested
    if kind == 5:
        return [{"id": rng.randrange(-5, 100), "scale": rng.random() * 1e6}]
    if kind == 6:
        return rng.choice([True, False, None])
    return {str(rng.randrange(-10, 10**6)): rng.random() for _ in range(rng.randrange(1, 50))}


def body(endpoint: str, extra: dict) -> dict:
    base = {"chat/completions": {"messages": MESSAGES, "max_tokens": 2}, "completions": {"prompt": "Hi", "max_tokens": 2},
            "embeddings": {"input": "Hi"}}[endpoint]
    return {"model": DEFAULT_MODEL, **base, **extra}


def engine_up(stack) -> tuple[list[int], int]:
    [replica] = readiness(stack.root)["models"][DEFAULT_MODEL]["engines"]
    assert replica["state"] == "ready", replica
    pids = stack.engine_pids()
    assert len(pids) == 1, pids
    return pids, replica["restarts"]


def test_engine_crashing_inputs_are_refused_by_name_and_the_engine_stays_up(stack):
    rng = random.Random(SEED)
    before = engine_up(stack)
    cases = [*FOUND]
    for _ in range(120):
        name = rng.choice(LLAMA_CPP_FIELDS)
        cases.append((rng.choice(["chat/completions", "completions"]), {name: junk(rng)}, name))
    for bounded, bad in [("temperature", [-0.1, 2.1, 1e308]), ("top_p", [-1, 1.5]), ("presence_penalty", [-3, 1e9]),
                         ("frequency_penalty", [2.5, -1e308]), ("max_tokens", [0, -1, 2**31, 2**62]),
                         ("top_logprobs", [-1, 21, 2**31]), ("top_k", [-1, 1001]), ("min_p", [1.1, -1e-9]),
                         ("typical_p", [-0.5, 2]), ("repeat_penalty", [0, -1, 2.01]), ("repeat_last_n", [-1, 4097]),
                         ("ignore_eos", ["yes", 1])]:
        cases += [("chat/completions", {bounded: value}, bounded) for value in bad]
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.admin_key}"},
                      timeout=60) as client:
        for endpoint, extra, param in cases:
            answer = client.post("/" + endpoint, json=body(endpoint, extra))
            assert answer.status_code == 400, (extra, answer.text)
            assert answer.json()["error"]["param"] == param, (extra, answer.text)
            assert param.split("[")[0] in answer.json()["error"]["message"]
        for prompt in TOKEN_PROMPTS:
            answer = client.post("/completions", json=body("completions", {"prompt": prompt}))
            assert 400 <= answer.status_code < 500, (prompt, answer.text)
        for endpoint, extra in HARMLESS:
            answer = client.post("/" + endpoint, json=body(endpoint, extra))
            assert answer.status_code == 200, (extra, answer.text)
        assert engine_up(stack) == before, "the engine was restarted"
        answer = client.post("/chat/completions", json=body("chat/completions", {"max_tokens": 4}))
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


def test_a_profile_allows_named_engine_params_as_sent():
    model = msgspec.convert({"name": "m", "engine": "llamacpp", "path": "/m.gguf", "engine_params": ["grammar", "top_k"]},
                            ModelConfig)
    served = served_model(model, GatewayConfig(), [], 0)
    for extra in [{"grammar": 'root ::= "a"'}, {"top_k": 100000}, {"top_k": 5, "min_p": 0.5}]:
        fields = {"model": "m", "messages": MESSAGES, **extra}
        engine_params.check(fields, msgspec.convert(fields, ChatCompletionRequest), served)
    fields = {"model": "m", "messages": MESSAGES, "grammar": "x", "json_schema": {}}
    with pytest.raises(InvalidRequest) as refused:
        engine_params.check(fields, msgspec.convert(fields, ChatCompletionRequest), served)
    assert refused.value.param == "json_schema" and "models[].engine_params" in refused.value.message
