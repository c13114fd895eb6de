"""Admission, in memory: who may run a model, a request's worst case and the cap that bounds it,
and masking answers."""

from __future__ import annotations

import msgspec
import pytest

from appliance.errors import InvalidRequest, ModelNotAllowed, PermissionDenied
from appliance.governance import Limits, Policy, Principal
from appliance.policies import mask_arguments
from services.gateway import schemas
from services.gateway.adapters import Outgoing, adapt
from services.gateway.admission import (
    REMOTE_COMPLETION_CAP,
    TEMPLATE_TOKENS,
    authorise,
    budget_cap,
    masked_answer,
    refuse_unmaskable,
    worst_tokens,
)
from services.gateway.replicas import ModelPool
from services.gateway.runtime import ReplicaEndpoint, ServedModel

LOCAL = ServedModel(name="local-1", engine="llamacpp", replicas=[ReplicaEndpoint(base_url="http://127.0.0.1:1/v1")],
                    context_length=2048)
REMOTE = ServedModel(name="remote-1", engine="remote", replicas=[ReplicaEndpoint(base_url="http://127.0.0.1:2/v1")])
MASK_PHONES = Policy(pii={"phone": "mask"}, pii_responses=True)


def principal(role="developer", **kwargs) -> Principal:
    return Principal(key_id="key_1", name="k", role=role, **kwargs)


def test_a_viewer_may_not_run_a_model():
    with pytest.raises(PermissionDenied, match="viewer role"):
        authorise(principal("viewer"), LOCAL.name)


def test_model_lists_of_the_key_and_its_team_both_apply():
    authorise(principal(limits=Limits(models=["local-*"])), LOCAL.name)
    with pytest.raises(ModelNotAllowed) as refused:
        authorise(principal(limits=Limits(models=["local-*"]), team_limits=Limits(models=["other"])), LOCAL.name)
    assert refused.value.param == "model" and refused.value.code == "model_not_allowed"


def test_a_budgeted_request_without_a_limit_to_a_model_of_unknown_context_gets_the_reserved_cap():
    def cap(body: bytes, served: ServedModel, **limits) -> int | None:
        return budget_cap(principal(**limits), "chat/completions", schemas.decode(body, schemas.ChatCompletionRequest),
                          served)

    bare = b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}'
    assert cap(bare, REMOTE, limits=Limits(budget_tokens=1000)) == REMOTE_COMPLETION_CAP
    assert cap(bare, REMOTE, team_limits=Limits(budget_cost=5.0)) == REMOTE_COMPLETION_CAP
    assert cap(bare, REMOTE, limits=Limits(rpm=10)) is None  # no budget to overrun
    assert cap(bare, LOCAL, limits=Limits(budget_tokens=1000)) is None  # its context bounds it
    named = b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 9}'
    assert cap(named, REMOTE, limits=Limits(budget_tokens=1000)) is None
    embedding = schemas.decode(b'{"model": "m", "input": "Hi"}', schemas.EmbeddingRequest)
    assert budget_cap(principal(limits=Limits(budget_tokens=1000)), "embeddings", embedding, REMOTE) is None


def test_the_cap_is_sent_in_each_endpoints_own_field():
    pool = ModelPool(REMOTE)
    for endpoint, schema, body, field in [
        ("chat/completions", schemas.ChatCompletionRequest,
         b'{"model": "remote-1", "messages": [{"role": "user", "content": "Hi"}]}', "max_completion_tokens"),
        ("completions", schemas.CompletionRequest, b'{"model": "remote-1", "prompt": "Hi"}', "max_tokens"),
    ]:
        parsed = schemas.decode(body, schema)
        cap = budget_cap(principal(limits=Limits(budget_tokens=10**6)), endpoint, parsed, REMOTE)
        sent = msgspec.json.decode(adapt(Outgoing(body), parsed, pool, max_n=4, cap=cap).body)
        assert sent[field] == REMOTE_COMPLETION_CAP and sent["model"] == "remote-1"
        assert adapt(Outgoing(body), parsed, pool, max_n=4).body == body  # no cap: the client's bytes


def test_the_worst_case_bounds_prompt_and_every_choice():
    body = b'{"model": "local-1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000, "n": 3}'
    parsed = schemas.decode(body, schemas.ChatCompletionRequest)
    assert worst_tokens("chat/completions", parsed, len(body), LOCAL) == (len(body) + TEMPLATE_TOKENS, 3 * 2048)
    no_cap = schemas.decode(b'{"model": "remote-1", "messages": [{"role": "user", "content": "Hi"}]}',
                            schemas.ChatCompletionRequest)
    assert worst_tokens("chat/completions", no_cap, 70, REMOTE)[1] == REMOTE_COMPLETION_CAP
    assert worst_tokens("embeddings", no_cap, 70, LOCAL) == (70 + TEMPLATE_TOKENS, 0)


def test_answers_are_masked_when_the_policy_asks_and_left_byte_for_byte_otherwise():
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Call 010-1234-5678 now"}}]}
    masked = msgspec.json.decode(masked_answer(MASK_PHONES, msgspec.json.encode(chat)))
    assert masked["choices"][0]["message"]["content"] == "Call [PHONE] now"
    responses = {"output": [{"type": "message", "content": [{"type": "output_text", "text": "010-1234-5678"}]}]}
    assert b"[PHONE]" in masked_answer(MASK_PHONES, msgspec.json.encode(responses))
    clean = b'{"choices": [{"index": 0, "text": "nothing here"}]}'
    assert masked_answer(MASK_PHONES, clean) is clean
    odd = b'{"choices": [null, "x", {"index": 1, "message": {"content": "010-1234-5678", "reasoning": "ok"}}]}'
    assert msgspec.json.decode(masked_answer(MASK_PHONES, odd))["choices"] == [  # an odd upstream's stray items pass
        None, "x", {"index": 1, "message": {"content": "[PHONE]", "reasoning": "ok"}}]


def test_reasoning_and_tool_call_arguments_are_masked_too():
    arguments = '{"to": "010-1234-5678", "body": "hi", "retries": 2}'
    chat = {"choices": [{"index": 0, "message": {
        "role": "assistant", "content": None, "reasoning_content": "Their number is 010-1234-5678.",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "sms", "arguments": arguments}},
                       {"id": "c2", "type": "function", "function": {"name": "noop", "arguments": '{ "a": 1 }'}}]}}]}
    message = msgspec.json.decode(masked_answer(MASK_PHONES, msgspec.json.encode(chat)))["choices"][0]["message"]
    assert message["reasoning_content"] == "Their number is [PHONE]."
    assert msgspec.json.decode(message["tool_calls"][0]["function"]["arguments"]) == {
        "to": "[PHONE]", "body": "hi", "retries": 2}
    assert message["tool_calls"][1]["function"]["arguments"] == '{ "a": 1 }'  # nothing masked: as sent
    responses = {"output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "call 010-1234-5678"}]},
        {"type": "function_call", "name": "sms", "call_id": "c1", "arguments": arguments}]}
    output = msgspec.json.decode(masked_answer(MASK_PHONES, msgspec.json.encode(responses)))["output"]
    assert output[0]["summary"][0]["text"] == "call [PHONE]" and "[PHONE]" in output[1]["arguments"]


def test_arguments_that_are_not_json_and_numbers_that_are_values_are_masked():
    cards = Policy(pii={"credit_card": "mask"}, pii_responses=True)
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "pay", "arguments": '{"card": 4111111111111111}'}},
        {"id": "c2", "type": "function", "function": {"name": "pay", "arguments": "card 4111 1111 1111 1111, {"}}]}}]}
    calls = msgspec.json.decode(masked_answer(cards, msgspec.json.encode(chat)))["choices"][0]["message"]["tool_calls"]
    assert msgspec.json.decode(calls[0]["function"]["arguments"]) == {"card": "[CREDIT_CARD]"}
    assert calls[1]["function"]["arguments"] == "card [CREDIT_CARD], {"


def test_an_arguments_key_is_context_for_its_value():
    accounts = Policy(pii={"bank_account": "mask"}, pii_responses=True)
    assert mask_arguments(accounts, '{"account": "110-123-456789"}') == '{"account":"[BANK_ACCOUNT]"}'
    assert mask_arguments(accounts, '{"value": "110-123-456789"}') == '{"value": "110-123-456789"}'  # no context word


@pytest.mark.parametrize("endpoint, schema, logprobs", [
    ("chat/completions", schemas.ChatCompletionRequest, '"logprobs": true, "top_logprobs": 2'),
    ("completions", schemas.CompletionRequest, '"logprobs": 0'),
])
def test_logprobs_are_refused_where_answers_are_masked(endpoint, schema, logprobs):
    field = '"messages": [{"role": "user", "content": "Hi"}]' if endpoint == "chat/completions" else '"prompt": "Hi"'
    asking = schemas.decode(f'{{"model": "m", {field}, {logprobs}}}'.encode(), schema)
    with pytest.raises(InvalidRequest, match="pii_responses") as refused:
        refuse_unmaskable(MASK_PHONES, asking)
    assert refused.value.param == "logprobs"
    refuse_unmaskable(Policy(pii={"phone": "mask"}), asking)  # requests masked, answers not: allowed
    refuse_unmaskable(MASK_PHONES, schemas.decode(f'{{"model": "m", {field}}}'.encode(), schema))
