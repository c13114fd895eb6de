"""Admission of one OpenAI request, in memory on the event loop: may this caller run this
model at all (role, the key's and team's model lists, data residency), and how many tokens
it can cost at worst, which the governor reserves against the limits and budgets
(appliance/limits.py) until the answer settles the real count."""

from __future__ import annotations

from appliance.errors import ModelNotAllowed, PermissionDenied
from appliance.governance import Principal
from services.gateway.runtime import ServedModel

INFERENCE_ROLES = frozenset(("admin", "operator", "developer"))
# A byte-level BPE token holds at least one byte of text, so a request body's size bounds the
# tokens of the text it carries; the chat template adds its own (role markers, a default
# system prompt) on top.
TEMPLATE_TOKENS = 64
# What a request that names no max_tokens may generate on a model whose context the profile
# does not give (remote upstreams), when its key or team has a token or cost budget: the
# gateway sends this cap to the upstream, so the budget's reservation holds.
REMOTE_COMPLETION_CAP = 4096


def authorise(principal: Principal, served: ServedModel) -> None:
    if principal.role not in INFERENCE_ROLES:
        raise PermissionDenied(f"The {principal.role} role reads /v1/models but may not run models; "
                               "a developer, operator or admin key may.")
    if not principal.allows_model(served.name):
        raise ModelNotAllowed(f"This key may not use the model '{served.name}' (its or its team's `models` limit).",
                              param="model")
    if principal.policy.no_external and served.engine == "remote":
        raise ModelNotAllowed(f"The model '{served.name}' is a remote upstream, and this team's requests may not "
                              "leave the appliance (no external transfer).", param="model",
                              code="external_transfer_not_allowed")


def completion_cap(parsed, served: ServedModel) -> int | None:
    """The most completion tokens one choice may take, where the request or the model bounds it."""
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if value := getattr(parsed, field, None):
            return value if served.context_length is None else min(value, served.context_length)
    return served.context_length


def worst_tokens(endpoint: str, parsed, body_size: int, served: ServedModel) -> tuple[int, int]:
    """(prompt, completion) tokens this request may cost at most."""
    prompt = body_size + TEMPLATE_TOKENS
    if endpoint == "embeddings":
        return prompt, 0
    per_choice = completion_cap(parsed, served) or REMOTE_COMPLETION_CAP
    return prompt, per_choice * (getattr(parsed, "n", None) or 1)
