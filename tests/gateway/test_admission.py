"""Admission, in memory: who may run a model, a request's worst case, and masking answers."""

from __future__ import annotations

import msgspec
import pytest

from appliance.errors import InvalidRequest, ModelNotAllowed, PermissionDenied
from appliance.governance import Limits, Policy, Principal
from services.gateway import schemas
from services.gateway.admission import REMOTE_COMPLETION_CAP, TEMPLATE_TOKENS, authorise, masked_answer, worst_tokens
from services.gateway.runtime import ReplicaEndpoint, ServedModel

LOCAL = ServedModel(name="local-1", engine="llamacpp", replicas=[ReplicaEndpoint(base_url="http://127.0.0.1:1/v1")],
                    context_length=2048)
REMOTE = ServedModel(name="remote-1", engine="remote", replicas=[ReplicaEndpoint(base_url="http://127.0.0.1:2/v1")])
MASK_PHONES = Policy(pii={"phone": "mask"}, pii_responses=True)


def principal(role="developer", **kwargs) -> Principal:
    return Principal(key_id="key_1", name="k", role=role, **kwargs)


def test_a_viewer_may_not_run_a_model():
    with pytest.raises(PermissionDenied, match="viewer role"):
        authorise(principal("viewer"), LOCAL, False)


def test_model_lists_of_the_key_and_its_team_both_apply():
    authorise(principal(limits=Limits(models=["local-*"])), LOCAL, False)
    with pytest.raises(ModelNotAllowed) as refused:
        authorise(principal(limits=Limits(models=["local-*"]), team_limits=Limits(models=["other"])), LOCAL, False)
    assert refused.value.param == "model" and refused.value.code == "model_not_allowed"


def test_no_external_transfer_refuses_remote_models_only():
    kept = principal(policy=Policy(no_external=True))
    authorise(kept, LOCAL, False)
    with pytest.raises(ModelNotAllowed) as refused:
        authorise(kept, REMOTE, False)
    assert refused.value.code == "external_transfer_not_allowed"


def test_a_policy_that_masks_answers_refuses_streams():
    authorise(principal(policy=MASK_PHONES), LOCAL, False)
    with pytest.raises(InvalidRequest) as refused:
        authorise(principal(policy=MASK_PHONES), LOCAL, True)
    assert refused.value.param == "stream" and refused.value.status == 400


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
