"""`appliance keys ...`: API keys through the admin API (/admin/keys), so every change is
authorised and audited by the gateway; `keys bootstrap` alone works on the home directly.
The limit and policy options that keys and teams share are defined here, once."""

from __future__ import annotations

import functools

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, money, percent, table, utc, when
from appliance.cli_options import client_options, home_option, json_option
from appliance.errors import StateError
from appliance.governance import ALL_DETECTORS
from appliance.home import admin_key_path, resolve_home, state_db_path
from appliance.keys import ROLES
from appliance.teams import PII_ACTIONS, Settings


# --- the limits and policy options of keys and teams, defined once ---------------------

CLEAR = "off"  # any limit or policy option: back to its default (no limit, nothing masked or denied)
_NULL = object()  # sent as JSON null


class _Limit(click.ParamType):
    """A number, or `off` to remove the limit."""

    def __init__(self, kind: type):
        self.kind, self.name = kind, kind.__name__

    def convert(self, value, param, ctx):
        if value is _NULL or isinstance(value, self.kind):
            return value
        if value == CLEAR:
            return _NULL
        try:
            return self.kind(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or '{CLEAR}'", param, ctx)


def _models(ctx, param, value):
    if value is None:
        return None
    return _NULL if value == CLEAR else [m.strip() for m in value.split(",") if m.strip()]


def _pii(ctx, param, value):
    """`mask` (every detector), `rrn=block,phone=mask` (each named one), or `off`."""
    if value is None:
        return None
    if value == CLEAR:
        return _NULL
    if value in PII_ACTIONS:
        return {ALL_DETECTORS: value}
    rules = {}
    for part in value.split(","):
        name, sep, action = part.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{part!r}: expected DETECTOR=ACTION (like rrn=block,phone=mask), "
                                     f"one of {', '.join(PII_ACTIONS)} for every detector, or '{CLEAR}'")
        rules[name.strip()] = action.strip()
    return rules


def _cleared(ctx, param, value):
    return _NULL if value == CLEAR else value


def _deny(ctx, param, value):
    if not value:
        return None
    return _NULL if value == (CLEAR,) else list(value)


_RULE_ACTIONS = click.Choice(["off", "flag", "block"])
_SETTINGS_OPTIONS = [
    click.option("--models", metavar="M,...", callback=_models,
                 help=f"The models it may use: names or globs (gpt-*), comma-separated; '{CLEAR}': every model."),
    click.option("--rpm", type=_Limit(int), metavar="N",
                 help=f"Requests per minute ('{CLEAR}': no limit, likewise below)."),
    click.option("--tpm", type=_Limit(int), metavar="N", help="Tokens (prompt and completion) per minute."),
    click.option("--max-parallel", type=_Limit(int), metavar="N", help="Requests in flight at once."),
    click.option("--budget-tokens", type=_Limit(int), metavar="N", help="Tokens per budget period."),
    click.option("--budget-cost", type=_Limit(float), metavar="X",
                 help="Cost per budget period, in the profile's currency."),
    click.option("--period", type=click.Choice(["day", "month"]), help="The budget period (UTC); default month."),
    click.option("--priority", type=click.Choice(["interactive", "batch", CLEAR]), callback=_cleared,
                 help="Waiting for a busy local model: interactive requests go before batch ones; default "
                      f"interactive (a key's, else its team's; '{CLEAR}' clears)."),
    click.option("--pii", metavar="SPEC", callback=_pii,
                 help="PII policy: 'mask' (or block, allow) for every detector, 'rrn=block,phone=mask' for "
                      f"named ones, '{CLEAR}' to clear."),
    click.option("--pii-responses/--no-pii-responses", default=None, help="Mask PII in answers too."),
    click.option("--deny", metavar="PHRASE", multiple=True, callback=_deny,
                 help=f"A phrase (or re:REGEX) requests may not contain; repeat for more; '{CLEAR}' clears the list."),
    click.option("--deny-action", type=_RULE_ACTIONS, help="What a deny-list match does; default block."),
    click.option("--injection", type=_RULE_ACTIONS, help="Prompt-injection heuristics: flag (audited) or block; default off."),
    click.option("--no-external/--external", default=None,
                 help="Keep requests off remote upstreams (data residency), or allow them again."),
    click.option("--log-requests/--no-log-requests", default=None,
                 help="Keep the requests and answers (PII masked) for `appliance logs`, or stop keeping them."),
]
def settings_options(function):
    """The limit and policy options of `keys create|update` and `teams create|update`: the
    command gets those given as one `settings` dict, the body's Settings (`off`: null)."""

    @functools.wraps(function)
    def command(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in Settings.__struct_fields__}
        settings = {name: None if value is _NULL else value for name, value in given.items() if value is not None}
        return function(*args, settings=settings, **kwargs)

    for option in reversed(_SETTINGS_OPTIONS):
        command = option(command)
    return command


def limits_text(limits: dict) -> str:
    return ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in limits.items()) or "none"


def policy_text(policy: dict) -> str:
    def shown(value) -> str:
        if isinstance(value, dict):
            return ",".join(f"{k}={v}" for k, v in value.items())
        return ",".join(value) if isinstance(value, list) else str(value).lower()

    return "; ".join(f"{k}={shown(v)}" for k, v in policy.items()) or "none"


def describe_settings(row: dict) -> str:
    """A key's or team's limits and policy, one line each."""
    return f"limits: {limits_text(row['limits'])}\npolicy: {policy_text(row['policy'])}"


def _spent_parts(spend: dict, *, short: bool) -> list[str]:
    parts, of = [], "/" if short else " of "
    if spend["budget_tokens"] is not None:
        unit = "" if short else " tokens"
        parts.append(f"{spend['tokens']}{of}{spend['budget_tokens']}{unit} "
                     f"({percent(spend['tokens'], spend['budget_tokens'])})")
    if spend["budget_cost"] is not None:
        parts.append(f"{money(spend['cost'])}{of}{money(spend['budget_cost'])} {spend['currency']} "
                     f"({percent(spend['cost'], spend['budget_cost'])})")
    return parts


def spend_text(spend: dict | None) -> str | None:
    """A key's or team's `spend` line: what its budget has used this period, and what is reserved now."""
    if spend is None:
        return None
    period = "today" if spend["period"] == "day" else "this month"
    line = f"spend: {', '.join(_spent_parts(spend, short=False))} {period} (resets {utc(spend['period_end'])})"
    reserved = [f"{spend['reserved_tokens']} tokens" if spend["budget_tokens"] is not None else "",
                f"{money(spend['reserved_cost'])} {spend['currency']}" if spend["budget_cost"] is not None else ""]
    if spend["reserved_tokens"] or spend["reserved_cost"]:
        line += f"; reserved now: {', '.join(r for r in reserved if r)}"
    return line


def spent_cell(spend: dict | None) -> str | None:
    """The SPENT column of a list: 420/1000 (42%), 0.0123/5.00 USD (<1%); - without a budget."""
    return None if spend is None else ", ".join(_spent_parts(spend, short=True))


def with_spend(text: str, row: dict) -> str:
    """`text` and, where the row has a budget, its spend line."""
    line = spend_text(row.get("spend"))
    return text if line is None else f"{text}\n{line}"


def _expiry(expires_in: str | None) -> dict:
    if expires_in is None:
        return {}
    return {"expires_at": None} if expires_in == "never" else {"expires_in": expires_in}


# --- keys ------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Create, list, show, update and revoke API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES),
              help="What the key may do (metrics: read /metrics, /readyz and /schema, nothing else); "
                   "at most the role of the key that creates it, and of its user. Default: the user's role, "
                   "else developer.")
@click.option("--user", help="The user (name or id) it acts for.")
@click.option("--team", help="The team (name or id) it is billed to: its limits and policy apply too. With --user, "
                             "one of the user's teams; default: their first team by name, if any.")
@click.option("--expires-in", metavar="DURATION", help="Expire after this long, e.g. 30d, 12h.")
@settings_options
@client_options
@json_option()
def keys_create(name, role, user, team, expires_in, settings, url, key, home, as_json):
    """Create a key named NAME and print its secret (shown only this once)."""
    body = {"name": name, "role": role, "user": user, "team": team, "expires_in": expires_in}
    created = make_client(url, key, home).post("/admin/keys", {k: v for k, v in body.items() if v is not None}
                                               | settings)

    def render(k):
        expires = when(k["expires_at"]) if k["expires_at"] else "never"
        return (f"created {k['id']} ({k['role']}) named {k['name']!r}, expires {expires}\n"
                f"key: {k['key']}\nStore it now: it cannot be shown again.")

    emit(created, as_json, render)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@client_options
@json_option()
def keys_list(include_revoked, url, key, home, as_json):
    """List API keys (never their secrets), with what each budget has spent this period."""
    rows = make_client(url, key, home).get("/admin/keys", include_revoked=include_revoked or None)
    emit(rows, as_json, lambda rs: table(
        [{**r, "prefix": r["prefix"] + "…", "created": when(r["created_at"]), "expires": when(r["expires_at"]),
          "spent": spent_cell(r.get("spend"))}
         for r in rs], ["id", "name", "role", "kind", "prefix", "state", "created", "expires", "spent"]))


def _render_key(k: dict) -> str:
    owner = [f"user {k['user_name'] or k['user_id']}" if k["user_id"] else "",
             f"team {k['team_name'] or k['team_id']}" if k["team_id"] else ""]
    return (f"{k['id']} ({k['role']}, {k['kind']}, {k['state']}) named {k['name']!r}, prefix {k['prefix']}…\n"
            f"owner: {', '.join(o for o in owner if o) or 'none'}\n"
            f"created {when(k['created_at'])}, expires {when(k['expires_at']) if k['expires_at'] else 'never'}\n"
            + with_spend(describe_settings(k), k))


@keys.command("show")
@click.argument("key_id")
@client_options
@json_option()
def keys_show(key_id, url, key, home, as_json):
    """Show the key with id (or displayed prefix, or unique name) KEY_ID: owner, expiry, limits, policy, and
    what its budget has spent this period."""
    emit(make_client(url, key, home).get(f"/admin/keys/{key_id}"), as_json, _render_key)


@keys.command("update")
@click.argument("key_id")
@click.option("--name", help="A new name.")
@click.option("--role", type=click.Choice(ROLES), help="A new role: at most yours, and its user's.")
@click.option("--expires-in", metavar="DURATION",
              help="Expire this long from now, e.g. 30d; 'never' removes the expiry.")
@settings_options
@client_options
@json_option()
def keys_update(key_id, name, role, expires_in, settings, url, key, home, as_json):
    """Change the key KEY_ID (id, prefix or unique name): its name, role, expiry, limits or policy; what is not given stays.
    The gateway applies it within a second."""
    body = {k: v for k, v in {"name": name, "role": role}.items() if v is not None} | _expiry(expires_in) | settings
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    updated = make_client(url, key, home).request("PATCH", f"/admin/keys/{key_id}", json=body)
    emit(updated, as_json, lambda k: f"updated {k['id']} ({k['name']})\n" + describe_settings(k))


@keys.command("revoke")
@click.argument("key_id")
@client_options
def keys_revoke(key_id, url, key, home):
    """Revoke the key with id (or displayed prefix, or unique name) KEY_ID; the gateway refuses it within a second."""
    revoked = make_client(url, key, home).post(f"/admin/keys/{key_id}/revoke")
    click.echo(f"revoked {revoked['id']} ({revoked['name']})")


@keys.command("bootstrap")
@home_option()
def keys_bootstrap(home):
    """Make an admin key when none is at hand: the first key of a k3s deployment, a lost
    admin.key, a restored home. Prints its secret once and saves it as the home's admin.key.

    Runs on this machine against the home's state database, not through the admin API:
    without a key there is nothing to call it with. The creation is in the audit log.
    """
    from appliance.db import open_db
    from appliance.keys import create_admin_key

    home_dir = resolve_home(home)
    if not state_db_path(home_dir).is_file():
        raise StateError(f"{home_dir} has no state database ({state_db_path(home_dir).name}): "
                         "start the appliance on it first (`appliance up` makes the first admin key itself)")
    if admin_key_path(home_dir).exists():
        raise StateError(f"{admin_key_path(home_dir)} already holds an admin key: use it (or `keys create` with it); "
                         "move the file away first to make a new one")
    db = open_db(state_db_path(home_dir))
    try:
        secret = create_admin_key(db, admin_key_path(home_dir), name="admin (bootstrap)", by="appliance keys bootstrap")
    finally:
        db.conn.close()
    click.echo(f"admin key: {secret}")
    click.echo(f"(shown once; also saved to {admin_key_path(home_dir)}, mode 0600; the gateway accepts it within a second)")
