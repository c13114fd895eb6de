"""What governs a request: the limits and policies of keys and teams, and who is asking.

A key's limits and a team's limits are counted apart (a team's are shared by all its
keys) and both must allow a request: the tighter one wins. Policies merge the same way:
for each rule, the stricter of the key's and the team's.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated, Literal

import msgspec

Period = Literal["day", "month"]
Priority = Literal["interactive", "batch"]
PiiAction = Literal["allow", "mask", "block"]
RuleAction = Literal["off", "flag", "block"]
Count = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Money = Annotated[float, msgspec.Meta(gt=0, le=1e15)]
ALL_DETECTORS = "*"  # a PII policy entry for every detector

_PII_STRICTNESS = {"allow": 0, "mask": 1, "block": 2}
_RULE_STRICTNESS = {"off": 0, "flag": 1, "block": 2}


class Limits(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True, frozen=True):
    """What a key or a team may use; None is no limit."""

    models: list[Annotated[str, msgspec.Meta(min_length=1)]] | None = None  # names or globs (fnmatch)
    rpm: Count | None = None  # requests per minute
    tpm: Count | None = None  # tokens (prompt and completion) per minute
    max_parallel: Count | None = None  # requests in flight at once
    budget_tokens: Count | None = None  # tokens per period
    budget_cost: Money | None = None  # cost per period, in the profile's currency
    period: Period = "month"  # the budget's period: calendar day or month, UTC
    priority: Priority | None = None  # waiting for a busy model: interactive before batch (the key's, else the team's)

    def allows_model(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class Policy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True, frozen=True):
    """What may be in a request (and its answer), and where it may go."""

    no_external: bool = False  # never sent to a remote upstream (data residency)
    pii: dict[str, PiiAction] = {}  # detector (appliance/pii.py KINDS) or "*" -> action
    pii_responses: bool = False  # mask answers too, with the same detectors
    deny: list[Annotated[str, msgspec.Meta(min_length=1)]] = []  # content deny list
    deny_action: RuleAction = "block"
    injection: RuleAction = "off"  # prompt-injection heuristics
    log_requests: bool = False  # keep its requests and answers, PII masked (services/gateway/request_logs.py)

    def pii_action(self, kind: str) -> PiiAction:
        return self.pii.get(kind, self.pii.get(ALL_DETECTORS, "allow"))

    @property
    def inspects(self) -> bool:
        """Whether a request body must be read for this policy at all (the hot path skips it otherwise)."""
        actions = self.pii.values()
        return bool(self.deny) or self.injection != "off" or "mask" in actions or "block" in actions


NO_LIMITS = Limits()
NO_POLICY = Policy()


def merge_policies(*policies: Policy) -> Policy:
    """The strictest of each rule across `policies` (a key's and its team's)."""
    kinds = {kind for p in policies for kind in p.pii}
    pii = {kind: max((p.pii_action(kind) for p in policies), key=_PII_STRICTNESS.__getitem__) for kind in kinds}
    return Policy(
        no_external=any(p.no_external for p in policies),
        # "*" and every detector that differs from it (an "allow" exception to "*": "mask" stays)
        pii={k: a for k, a in pii.items() if k == ALL_DETECTORS or a != pii.get(ALL_DETECTORS, "allow")},
        pii_responses=any(p.pii_responses for p in policies),
        deny=sorted({d for p in policies for d in p.deny}),
        deny_action=max((p.deny_action for p in policies if p.deny), key=_RULE_STRICTNESS.__getitem__, default="block"),
        injection=max((p.injection for p in policies), key=_RULE_STRICTNESS.__getitem__, default="off"),
        log_requests=any(p.log_requests for p in policies),
    )


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is asking, resolved once per key (or identity-provider token) off the request path:
    the limits counted against it and the policy its requests follow."""

    key_id: str | None  # None for a caller signed in by an identity provider's JWT
    name: str
    role: str
    user_id: str | None = None
    team_id: str | None = None
    team_name: str | None = None  # for messages: a refusal names the team
    limits: Limits = NO_LIMITS  # the key's own (counted per key)
    team_limits: Limits = NO_LIMITS  # its team's (counted per team, shared by the team's keys)
    policy: Policy = NO_POLICY  # merged: key and team

    def allows_model(self, model: str) -> bool:
        return self.limits.allows_model(model) and self.team_limits.allows_model(model)

    @property
    def priority(self) -> Priority:
        return self.limits.priority or self.team_limits.priority or "interactive"
