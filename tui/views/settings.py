"""The limit and policy fields that keys and teams share (appliance.teams.Settings), as form
fields and back as the API's body. On an edit, a field emptied clears that setting; one left
as it was is not sent."""

from __future__ import annotations

from tui.modals import Field

CLEAR = ""
PERIODS = ("day", "month")
PRIORITIES = ("interactive", "batch")
RULE_ACTIONS = ("off", "flag", "block")

INTS = ("rpm", "tpm", "max_parallel", "budget_tokens")
LIMIT_LABELS = {
    "models": "Models (names or globs, comma-separated; empty: every model)",
    "rpm": "Requests per minute", "tpm": "Tokens per minute", "max_parallel": "Requests in flight at once",
    "budget_tokens": "Token budget per period", "budget_cost": "Cost budget per period",
    "period": "Budget period", "priority": "Priority when the model is busy",
}
POLICY_LABELS = {
    "pii": "PII actions (detector=action, comma-separated; * for every detector; actions allow, mask, block)",
    "pii_responses": "Mask PII in answers too (yes or no)",
    "deny": "Deny list (phrases or re:patterns, separated by |)",
    "deny_action": "What a deny-list match does", "injection": "Prompt-injection heuristics",
    "no_external": "Never send to a remote upstream (yes or no)",
}
CHOICES = {"period": PERIODS, "priority": PRIORITIES, "deny_action": RULE_ACTIONS, "injection": RULE_ACTIONS}


def shown(name: str, value) -> str:
    """A setting's value as its form field holds it."""
    if value is None:
        return ""
    if name == "pii":
        return ",".join(f"{k}={v}" for k, v in value.items())
    if name == "deny":
        return " | ".join(value)
    if name == "models":
        return ",".join(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def fields(labels: dict[str, str], current: dict) -> list[Field]:
    return [Field(name, label, shown(name, current.get(name)), choices=CHOICES.get(name)) for name, label in labels.items()]


def limit_fields(row: dict | None = None) -> list[Field]:
    return fields(LIMIT_LABELS, (row or {}).get("limits") or {})


def policy_fields(row: dict | None = None) -> list[Field]:
    return fields(POLICY_LABELS, (row or {}).get("policy") or {})


def _parsed(name: str, text: str):
    if name in INTS:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if name == "budget_cost":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"budget_cost: {text!r} is not a number") from None
    if name == "models":
        return [m.strip() for m in text.split(",") if m.strip()]
    if name == "deny":
        return [d.strip() for d in text.split("|") if d.strip()]
    if name == "pii":
        rules = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            detector, sign, action = part.partition("=")
            if not sign:
                raise ValueError(f"pii: {part!r} is not DETECTOR=ACTION (like phone=mask)")
            rules[detector.strip()] = action.strip()
        return rules
    if name in ("pii_responses", "no_external"):
        if text.lower() not in ("yes", "no", "true", "false"):
            raise ValueError(f"{name}: answer yes or no, not {text!r}")
        return text.lower() in ("yes", "true")
    return text


def settings_body(values: dict[str, str], current: dict | None = None) -> dict:
    """The Settings fields of `values` that differ from `current` (a key's or team's row):
    emptied ones as null (back to the default), changed ones parsed."""
    settings = {**((current or {}).get("limits") or {}), **((current or {}).get("policy") or {})}
    body = {}
    for name in (*LIMIT_LABELS, *POLICY_LABELS):
        if name not in values:
            continue
        text, before = values[name], shown(name, settings.get(name))
        if text == before:
            continue
        body[name] = None if text == CLEAR else _parsed(name, text)
    return body
