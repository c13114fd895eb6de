"""`appliance usage`: metered usage and its cost, through the admin API (GET /admin/usage)."""

from __future__ import annotations

import json

import click

from appliance.admin_client import make_client
from appliance.cli_format import table, when
from appliance.cli_options import client_options, json_option
from appliance.durations import parse_duration
from appliance.usage import GROUPINGS

NAMES = {"team": "team_name", "user": "user_name", "key": "key_name", "model": "model", "template": "template"}


def since(_ctx, _param, value: str) -> str:
    """Checked here too, so a typo is a usage error before the gateway is asked."""
    if value != "all":
        try:
            parse_duration(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def groups(_ctx, _param, value: str) -> str:
    names = [g.strip() for g in value.split(",")]
    if not all(g in GROUPINGS for g in names) or len(set(names)) != len(names):
        raise click.BadParameter(f"a comma-separated list of {', '.join(GROUPINGS)} (each once), not {value!r}")
    return ",".join(names)


def render(answer: dict) -> str:
    currency = answer["currency"]
    rows = [{**r, "cost": f"{r['cost']:.4f} {currency}", "last": when(r["last_ts"]),
             **{NAMES[g]: r.get(NAMES[g]) or r.get(f"{g}_id") for g in answer["by"]}} for r in answer["rows"]]
    columns = [NAMES[g] for g in answer["by"]]
    columns += ["requests", "errors", "prompt_tokens", "completion_tokens", "cost", "cached", "saved_tokens",
                "avg_latency_ms", "avg_ttft_ms", "last"]
    note = "\n(your own usage only)" if answer["own_only"] else ""
    return table(rows, columns) + note


@click.command()
@click.option("--since", default="24h", show_default=True, callback=since, help="How far back: e.g. 15m, 24h, 7d, or 'all'.")
@click.option("--by", default="key,model", show_default=True, callback=groups,
              help="How to group the totals: team, user, key, model or template (a prompt template's version), "
                   "or a comma-separated combination.")
@client_options
@json_option()
def usage(since: str, by: str, url, key, home, as_json: bool) -> None:
    """Summarise metered usage (requests, tokens, cost in the profile's currency, latency).

    Admins and operators see everyone's; other roles their own only. With --json, one object
    per group, its cost's currency included.
    """
    answer = make_client(url, key, home).get("/admin/usage", since=since, by=by)
    rows = [{**row, "currency": answer["currency"]} for row in answer["rows"]]
    click.echo(json.dumps(rows, indent=2) if as_json else render(answer))
