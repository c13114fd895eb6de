"""Admission of one OpenAI request, in memory on the event loop: may this caller run this
model at all (role, the key's and team's model lists, data residency), and how many tokens
it can cost at worst, which the governor reserves against the limits and budgets
(appliance/limits.py) until the answer settles the real count; a budgeted request is sent
with the completion cap it reserved."""

from __future__ import annotations

import msgspec

from appliance.errors import InvalidRequest, ModelNotAllowed, PermissionDenied
from appliance.governance import Policy, Principal
from appliance.permissions import at_least
from appliance.policies import mask_answer, mask_arguments
from services.gateway.runtime import ServedModel

INFERENCE_ROLES = frozenset(at_least("developer"))
# A byte-level BPE token holds at least one byte of text, so a request body's size bounds the
# tokens of the text it carries; the chat template adds its own (role markers, a default
# system prompt) on top.
TEMPLATE_TOKENS = 64
# The completion tokens reserved for a request that names no max_tokens, on a model whose
# context the profile does not give (remote upstreams). A budgeted caller's request is sent
# with this cap (`budget_cap`), so the reservation bounds it; anyone else's is counted in
# full when it settles, even where the upstream generated more (docs/governance.md).
REMOTE_COMPLETION_CAP = 4096
AFFINITY_BYTES = 512
CHAT_TEXTS = ("content", "reasoning_content", "reasoning")  # a chat message's texts ("reasoning": newer vLLM)


def authorise(principal: Principal, name: str) -> None:
    """May this caller run the model (or route) `name`? Where it may go is the route's part
    (services/gateway/app.py Gateway._plan leaves out remote upstreams under no_external)."""
    if principal.role not in INFERENCE_ROLES:
        raise PermissionDenied(f"The {principal.role} role reads /v1/models but may not run models; "
                               "a developer, operator or admin key may.")
    if not principal.allows_model(name):
        raise ModelNotAllowed(f"The `models` limit of this key or its team does not include '{name}'.",
                              param="model")


def affinity(headers, body: bytes) -> bytes:
    """What a prefix_affinity model keeps on one replica (services/gateway/replicas.py): the
    client's session (the x-session-id header), else the first AFFINITY_BYTES of its messages,
    prompt or input as sent (the system prompt and the conversation's first turns)."""
    session = headers.get("x-session-id")
    if session:
        return b"session:" + session.encode()
    for field in (b'"messages"', b'"prompt"', b'"input"'):
        start = body.find(field)
        if start >= 0:
            return body[start : start + AFFINITY_BYTES]
    return body[:AFFINITY_BYTES]


def completion_cap(parsed, served: ServedModel) -> int | None:
    """The most completion tokens one choice may take, where the request or the model bounds it."""
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if value := getattr(parsed, field, None):
            return value if served.context_length is None else min(value, served.context_length)
    return served.context_length


def budget_cap(principal: Principal, endpoint: str, parsed, served: ServedModel) -> int | None:
    """The completion cap the forwarded request must carry for its reservation to bound it: a request
    that names none, to a model of unknown context, from a caller with a token or cost budget."""
    if endpoint == "embeddings" or completion_cap(parsed, served) is not None:
        return None
    budgeted = any(limits.budget_tokens is not None or limits.budget_cost is not None
                   for limits in (principal.limits, principal.team_limits))
    return REMOTE_COMPLETION_CAP if budgeted else None


def worst_tokens(endpoint: str, parsed, body_size: int, served: ServedModel) -> tuple[int, int]:
    """(prompt, completion) tokens this request may cost at most."""
    prompt = body_size + TEMPLATE_TOKENS
    if endpoint == "embeddings":
        return prompt, 0
    per_choice = completion_cap(parsed, served) or REMOTE_COMPLETION_CAP
    return prompt, per_choice * (getattr(parsed, "n", None) or 1)


def refuse_unmaskable(policy: Policy, parsed) -> None:
    """Under `pii_responses` every text of an answer is masked, but token log probabilities cannot
    be (a value spans tokens, and each token comes with its text and bytes): they are refused."""
    if not policy.pii_responses:
        return
    logprobs = getattr(parsed, "logprobs", None)
    if logprobs is not None and logprobs is not False:  # a completion's 0 asks for them
        raise InvalidRequest("The policy of this key or its team masks personal data in answers "
                             "(pii_responses), which token log probabilities would reveal: leave out logprobs.",
                             param="logprobs")


def masked_answer(policy: Policy, payload: bytes) -> bytes:
    """A whole answer (chat, completion or Responses) with the policy's PII detectors masked in
    every text it carries (`pii_responses`): content, reasoning, tool-call arguments; the same
    bytes when there was nothing to mask."""
    answer = msgspec.json.decode(payload)
    changed = False

    def mask(holder, field: str, masker=mask_answer) -> None:
        nonlocal changed
        text = holder.get(field) if isinstance(holder, dict) else None
        if isinstance(text, str) and (masked := masker(policy, text)) != text:
            holder[field], changed = masked, True

    for choice in answer.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        mask(choice, "text")
        message = choice.get("message")
        if isinstance(message, dict):
            for field in CHAT_TEXTS:
                mask(message, field)
            mask(message.get("function_call"), "arguments", mask_arguments)
            for call in message.get("tool_calls") or []:
                mask(call.get("function") if isinstance(call, dict) else None, "arguments", mask_arguments)
    for item in answer.get("output") or []:
        if not isinstance(item, dict):
            continue
        mask(item, "arguments", mask_arguments)  # a function_call item
        for parts in (item.get("content"), item.get("summary")):  # message and reasoning items
            for part in parts if isinstance(parts, list) else []:
                mask(part, "text")
    return msgspec.json.encode(answer) if changed else payload
