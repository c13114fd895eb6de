"""`appliance logs ...`: the request logs, through /admin/request-logs (docs/observability.md#request-logs)."""

from __future__ import annotations

import json

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import client_options, json_option
from appliance.usage_cli import moment


@click.group()
def logs() -> None:
    """Request logs: the requests and answers of keys and teams whose policy logs them
    (`teams update TEAM --log-requests`), personal data masked, found by request id."""


@logs.command("list")
@click.option("--since", callback=moment, help="From when: a duration before now (24h) or an ISO date or time.")
@click.option("--team", help="Only this team's (its id).")
@click.option("--key-id", help="Only this key's (its id).")
@click.option("--model", help="Only this model's.")
@click.option("--status", type=click.IntRange(100, 599), help="Only requests that ended with this HTTP status.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@client_options
@json_option()
def logs_list(since, team, key_id, model, status, limit, url, key, home, as_json):
    """List kept requests, newest first (without their bodies: `logs show` has them)."""
    rows = make_client(url, key, home).get("/admin/request-logs", since=since, team=team, key=key_id, model=model,
                                           status=status, limit=limit)
    emit(rows, as_json, lambda rs: table([{**r, "when": when(r["ts"]), "latency_ms": round(r["latency_ms"] or 0)}
                                          for r in rs],
                                         ["request_id", "when", "model", "endpoint", "status", "latency_ms", "key_id",
                                          "team_id"]))


@logs.command("show")
@click.argument("request_id")
@client_options
@json_option()
def logs_show(request_id, url, key, home, as_json):
    """Show the request REQUEST_ID (a response's x-request-id): what it asked and what it got, masked."""
    entry = make_client(url, key, home).get(f"/admin/request-logs/{request_id}")

    def render(e: dict) -> str:
        def shown(value) -> str:
            return json.dumps(value, indent=2, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)

        head = (f"{e['request_id']} at {when(e['ts'])}: {e['endpoint']} {e['model']} -> {e['status']} "
                f"in {e['latency_ms'] or 0:.0f} ms (key {e['key_id'] or '-'}, team {e['team_id'] or '-'})")
        return f"{head}\n\nrequest:\n{shown(e['request'])}\n\nanswer:\n{shown(e['response']) if e['response'] else '(none)'}"

    emit(entry, as_json, render)
