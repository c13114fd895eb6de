"""Alert rules, channels and alerts: what the appliance watches, where it says so, and what it said.

A rule has a kind; each kind measures one thing per subject (a model, a GPU, a replica, a
key, a budget), compares it with the rule's threshold, and says it in a sentence:

  error_rate         share of a model's answers that were 5xx over window_s (5 min) > 0.05,
                     once it had MIN_REQUESTS requests in the window
  latency            p95 time to a model's full answer over window_s (5 min) > 30 s
  token_surge        a key's tokens over window_s (1 h) > threshold (3) times its average per
                     window_s over the 7 days before, when that average is at least MIN_TOKENS
  gpu_memory         a GPU's memory in use / its memory > 0.95
  gpu_temperature    a GPU's temperature > 85 °C
  engine_crash_loop  an engine replica restarted >= 3 times within window_s (10 min), or a model
                     has a replica marked failed
  budget             a key's or team's budget spent / budget >= 0.9 (tokens or cost)

The profile's `alerts` gives the rules (the DEFAULT_RULES, unless `default_rules: false`,
under those it names) and the channels; rules and channels stored through the admin API
(tables alert_rules and alert_channels) replace the profile's of the same name. Table
`alerts` holds every alert: pending while its condition has held less than the rule's
for_s, firing, then resolved; a rule and subject have at most one that is not resolved.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import msgspec

from appliance.config import AlertChannelSpec, AlertRuleSpec, AlertsConfig
from appliance.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    import sqlite_utils

MIN_REQUESTS = 10  # error_rate: fewer requests in the window say nothing
MIN_TOKENS = 1000  # token_surge: a smaller baseline (tokens per window) says nothing
BASELINE_S = 7 * 86400  # token_surge: the average is over this long before the window

# kind -> (threshold, window_s or None where the kind has no window, unit of the threshold)
KINDS: dict[str, tuple[float, float | None, str]] = {
    "error_rate": (0.05, 300.0, "share of answers"),
    "latency": (30.0, 300.0, "seconds (p95)"),
    "token_surge": (3.0, 3600.0, "times the average"),
    "gpu_memory": (0.95, None, "share of memory"),
    "gpu_temperature": (85.0, None, "°C"),
    "engine_crash_loop": (3.0, 600.0, "restarts"),
    "budget": (0.9, None, "share of the budget"),
}

DEFAULT_RULES = [
    AlertRuleSpec(name="error-rate", kind="error_rate", for_s=120, severity="critical"),
    AlertRuleSpec(name="latency", kind="latency", for_s=300),
    AlertRuleSpec(name="token-surge", kind="token_surge"),
    AlertRuleSpec(name="gpu-memory", kind="gpu_memory", for_s=300),
    AlertRuleSpec(name="gpu-temperature", kind="gpu_temperature", for_s=120, severity="critical"),
    AlertRuleSpec(name="engine-crash-loop", kind="engine_crash_loop", severity="critical"),
    AlertRuleSpec(name="budget", kind="budget"),
]

STATES = ("pending", "firing", "resolved")


def threshold_of(rule: AlertRuleSpec) -> float:
    return KINDS[rule.kind][0] if rule.threshold is None else rule.threshold


def window_of(rule: AlertRuleSpec) -> float | None:
    default = KINDS[rule.kind][1]
    return None if default is None else (rule.window_s or default)


def check_channel(channel: AlertChannelSpec, where: str) -> None:
    if (channel.webhook is None) == (channel.email is None):
        raise ValueError(f"{where}: give exactly one of webhook and email")


def check_rule(rule: AlertRuleSpec, where: str, channels: set[str]) -> None:
    unknown = [c for c in rule.channels if c not in channels]
    if unknown:
        raise ValueError(f"{where}.channels: no channel named {unknown[0]!r} (channels: {', '.join(sorted(channels)) or 'none'})")
    if rule.model is not None and rule.kind not in ("error_rate", "latency", "token_surge", "engine_crash_loop"):
        raise ValueError(f"{where}.model: a {rule.kind} rule is not about a model")
    if rule.window_s is not None and KINDS[rule.kind][1] is None:
        raise ValueError(f"{where}.window_s: a {rule.kind} rule has no window (it reads the state now)")


def check_config(config: AlertsConfig) -> None:
    """What the schema cannot say: unique names, one kind of channel each, rules naming real channels."""
    names: set[str] = set()
    for i, channel in enumerate(config.channels):
        if channel.name in names:
            raise ValueError(f"alerts.channels[{i}].name: duplicate channel name {channel.name!r}")
        names.add(channel.name)
        check_channel(channel, f"alerts.channels[{i}]")
    rules: set[str] = set()
    for i, rule in enumerate(config.rules):
        if rule.name in rules:
            raise ValueError(f"alerts.rules[{i}].name: duplicate rule name {rule.name!r}")
        rules.add(rule.name)
        check_rule(rule, f"alerts.rules[{i}]", names)


# --- what is in force: the profile's, under what the admin API stored ------------------------

def effective_channels(config: AlertsConfig, db: sqlite_utils.Database) -> dict[str, AlertChannelSpec]:
    channels = {c.name: c for c in config.channels}
    channels |= {name: msgspec.json.decode(spec, type=AlertChannelSpec)
                 for name, spec in db.execute("SELECT name, spec FROM alert_channels").fetchall()}
    return channels


def effective_rules(config: AlertsConfig, db: sqlite_utils.Database) -> dict[str, AlertRuleSpec]:
    rules = {r.name: r for r in DEFAULT_RULES} if config.default_rules else {}
    rules |= {r.name: r for r in config.rules}
    rules |= {name: msgspec.json.decode(spec, type=AlertRuleSpec)
              for name, spec in db.execute("SELECT name, spec FROM alert_rules").fetchall()}
    return rules


def origins(config: AlertsConfig, db: sqlite_utils.Database, table: str) -> dict[str, str]:
    """Where each rule or channel in force comes from: default, profile or api."""
    kind = "rules" if table == "alert_rules" else "channels"
    found = {r.name: "default" for r in DEFAULT_RULES} if kind == "rules" and config.default_rules else {}
    found |= {item.name: "profile" for item in getattr(config, kind)}
    found |= {name: "api" for (name,) in db.execute(f"SELECT name FROM {table}").fetchall()}
    return found


def describe_rule(rule: AlertRuleSpec, origin: str) -> dict:
    return {**msgspec.to_builtins(rule), "threshold": threshold_of(rule), "window_s": window_of(rule),
            "for_s": rule.for_s, "severity": rule.severity, "channels": rule.channels, "enabled": rule.enabled,
            "unit": KINDS[rule.kind][2], "origin": origin}


def describe_channel(channel: AlertChannelSpec, origin: str) -> dict:
    """A channel as the API shows it: an email channel's password stays in its variable."""
    return {**msgspec.to_builtins(channel), "origin": origin}


def store_rule(db: sqlite_utils.Database, config: AlertsConfig, rule: AlertRuleSpec) -> AlertRuleSpec:
    """Store `rule` (replacing the profile's or the built-in one of its name); 400 naming what is wrong."""
    try:
        check_rule(rule, "rule", set(effective_channels(config, db)))
    except ValueError as exc:
        field, _, message = str(exc).removeprefix("rule.").partition(": ")
        raise InvalidRequest(message, param=field) from None
    db.execute("INSERT INTO alert_rules (name, spec, updated_at) VALUES (?, ?, ?) "
               "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
               [rule.name, msgspec.json.encode(rule).decode(), time.time()])
    return rule


def store_channel(db: sqlite_utils.Database, channel: AlertChannelSpec) -> AlertChannelSpec:
    try:
        check_channel(channel, "channel")
    except ValueError as exc:
        raise InvalidRequest(str(exc).removeprefix("channel: "), param="webhook") from None
    db.execute("INSERT INTO alert_channels (name, spec, updated_at) VALUES (?, ?, ?) "
               "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
               [channel.name, msgspec.json.encode(channel).decode(), time.time()])
    return channel


def delete_stored(db: sqlite_utils.Database, table: str, name: str) -> None:
    """Forget what the API stored under `name`: the profile's (or the default) is in force again."""
    what = "rule" if table == "alert_rules" else "channel"
    if not db.execute(f"DELETE FROM {table} WHERE name = ?", [name]).rowcount:
        raise NotFound(f"No alert {what} named {name!r} was stored through the API (the profile's and the "
                       f"built-in ones are changed in the profile).", param="name")


# --- alerts ------------------------------------------------------------------------------------

def active(db: sqlite_utils.Database) -> dict[tuple[str, str], dict]:
    """The alerts not resolved, by (rule, subject)."""
    return {(a["rule"], a["subject"]): a for a in _rows(db, "WHERE state != 'resolved'", [])}


def list_alerts(db: sqlite_utils.Database, *, state: str | None = None, limit: int = 100) -> list[dict]:
    """Newest first; `state` one of STATES, or None for all."""
    if state is not None and state not in STATES:
        raise InvalidRequest(f"state must be one of {', '.join(STATES)}, not {state!r}", param="state")
    where, params = ("WHERE state = ?", [state]) if state else ("", [])
    return _rows(db, f"{where} ORDER BY started_at DESC, id DESC LIMIT ?", [*params, limit])


def _rows(db: sqlite_utils.Database, clause: str, params: list) -> list[dict]:
    cursor = db.execute(f"SELECT * FROM alerts {clause}", params)
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    for row in rows:
        row["labels"] = json.loads(row["labels"])
        row["deliveries"] = json.loads(row["deliveries"])
    return rows


def open_alert(db: sqlite_utils.Database, rule: AlertRuleSpec, subject: str, labels: dict, value: float,
               summary: str, now: float) -> dict:
    db.execute("INSERT INTO alerts (rule, kind, subject, labels, severity, state, value, threshold, summary, "
               "started_at, updated_at, deliveries) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, '{}')",
               [rule.name, rule.kind, subject, json.dumps(labels), rule.severity, value, threshold_of(rule), summary,
                now, now])
    return _rows(db, "WHERE id = last_insert_rowid()", [])[0]


def update_alert(db: sqlite_utils.Database, alert_id: int, **fields) -> None:
    if "deliveries" in fields:
        fields["deliveries"] = json.dumps(fields["deliveries"])
    assignments = ", ".join(f"{name} = ?" for name in fields)
    db.execute(f"UPDATE alerts SET {assignments} WHERE id = ?", [*fields.values(), alert_id])
