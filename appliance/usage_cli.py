"""`appliance usage`: metered usage and its cost, through the admin API (GET /admin/usage)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from appliance.admin_client import make_client
from appliance.analytics import BUCKETS, GROUPINGS
from appliance.cli_format import table, when, write_output
from appliance.cli_options import client_options, json_option
from appliance.durations import parse_moment

NAMES = {"team": "team_name", "user": "user_name", "key": "key_name", "model": "model", "route": "route",
         "template": "template"}


def moment(_ctx, _param, value: str | None) -> str | None:
    """Checked here too, so a typo is a usage error before the gateway is asked."""
    if value not in (None, "all"):
        try:
            parse_moment(value, time.time())
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
    columns = (["bucket"] if answer.get("bucket") else []) + [NAMES[g] for g in answer["by"]]
    columns += ["requests", "errors", "prompt_tokens", "completion_tokens", "cost", "cached", "saved_tokens",
                "avg_latency_ms", "avg_ttft_ms", "last"]
    note = "\n(your own usage only)" if answer["own_only"] else ""
    return table(rows, columns) + note


@click.command()
@click.option("--since", default="24h", show_default=True, callback=moment,
              help="From when: a duration before now (15m, 24h, 7d), an ISO date or time (UTC unless it says), "
                   "or 'all'.")
@click.option("--until", callback=moment, help="Until when (a duration before now or an ISO date or time). "
                                               "Default: now.")
@click.option("--by", default="key,model", show_default=True, callback=groups,
              help=f"How to group the totals: {', '.join(GROUPINGS)} (a prompt template's version), "
                   "or a comma-separated combination.")
@click.option("--bucket", type=click.Choice(BUCKETS), help="Also by time: a row per hour, day or month (UTC).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (one line per row, with the currency) instead of a table.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="With --csv: write to this file (complete or not at all) instead of standard output.")
@client_options
@json_option()
def usage(since: str, until: str | None, by: str, bucket: str | None, as_csv: bool, output: Path | None,
          url, key, home, as_json: bool) -> None:
    """Summarise metered usage: requests, errors, tokens, cost in the profile's currency, latency.

    Admins and operators see everyone's; other roles their own only. With --json, one object
    per group, its cost's currency included.
    """
    if output is not None and not as_csv:
        raise click.UsageError("--output goes with --csv")
    if as_csv and as_json:
        raise click.UsageError("--csv or --json, not both")
    client = make_client(url, key, home)
    query = {"since": since, "until": until, "by": by, "bucket": bucket}
    if as_csv:
        write_output(client.download("/admin/usage", **query, format="csv"), output)
        return
    answer = client.get("/admin/usage", **query)
    rows = [{**row, "currency": answer["currency"]} for row in answer["rows"]]
    click.echo(json.dumps(rows, indent=2) if as_json else render(answer))
