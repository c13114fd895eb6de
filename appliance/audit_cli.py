"""`appliance audit ...`: list, verify and export the hash-chained audit log through the
admin API (/admin/audit); `verify --local` also works on the home's database alone."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import click
import msgspec

from appliance.admin_client import AdminApiError, api_error, make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import client_options, json_option
from appliance.durations import parse_duration
from appliance.errors import StateError
from appliance.home import resolve_home, state_db_path


@click.group()
def audit() -> None:
    """The audit log: every change made through the admin API, refusals and logins, in a hash
    chain that shows any edited, deleted or reordered row."""


@audit.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--action", help="Only this action, e.g. model.register.")
@click.option("--target", help="Only targets starting with this, e.g. model/smollm2.")
@client_options
@json_option()
def audit_list(limit, action, target, url, key, home, as_json):
    """Show the newest entries of the audit log, newest first."""
    rows = make_client(url, key, home).get("/admin/audit", limit=limit, action=action, target=target)
    emit(rows, as_json, lambda rs: table([{**r, "when": when(r["ts"]), "who": r["key_name"] or r["key_id"]} for r in rs],
                                         ["when", "who", "role", "action", "target", "outcome", "request_id"]))


@audit.command("verify")
@click.option("--local", is_flag=True,
              help="Read the home's state database directly instead of asking the gateway: for when it is down. "
                   "Needs read and write access to the home (SQLite's WAL files), as its owner or root.")
@client_options
@json_option()
def audit_verify(local, url, key, home, as_json):
    """Check the audit log's hash chain, row by row. Exits 0 when it is intact; 1 naming the
    first bad row (edited, deleted, reordered, its hash changed) and why."""
    result = _verify_local(home) if local else make_client(url, key, home).get("/admin/audit/verify")
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result["ok"]:
        click.echo(_intact(result))
    else:
        click.echo(f"bad row {result['bad_id']}: {result['reason']} ({result['problem']}); "
                   f"{result['rows']} rows before it are intact")
    if not result["ok"]:
        sys.exit(1)


def _intact(result: dict) -> str:
    if result["first_id"] is None:
        return "ok: the audit log is empty"
    text = f"ok: {result['rows']} rows, chain intact from row {result['first_id']}"
    if result["pruned_through"]:
        text += f" (rows through {result['pruned_through']} removed by retention)"
    if result["unsealed"]:
        text += f"; {result['unsealed']} rows from before the chain are sealed at the next change"
    return text + f"\nhead: row {result['last_id']}, hash {result['head_hash']}"


def _verify_local(home: str | None) -> dict:
    from appliance import audit as audit_log
    from appliance.db import MIGRATIONS, open_db, schema_version

    path = state_db_path(resolve_home(home))
    if not path.is_file():
        raise StateError(f"{path} does not exist: pass the home of an appliance with --home")
    db = open_db(path, migrate=False)
    try:
        version = schema_version(db)
        if version != len(MIGRATIONS):
            raise StateError(f"{path} is at schema version {version} and this appliance at {len(MIGRATIONS)}: "
                             "start the gateway of the matching version on it, or verify through it")
        return msgspec.to_builtins(audit_log.verify(db))
    finally:
        db.conn.close()


def parse_time(text: str | None, param: str) -> float | None:
    """A point in time: a duration back from now (7d, 12h) or an ISO date or date-time (local time unless it says)."""
    if text is None:
        return None
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a duration back from now (7d, 12h) or a date "
                                 "(2025-01-31, 2025-01-31T08:00)", param_hint=param) from None


@audit.command("export")
@click.option("--since", metavar="WHEN", help="Only rows from then on: a duration back from now (30d, 12h) "
                                              "or an ISO date or date-time (2025-01-31). Default: all.")
@click.option("--until", metavar="WHEN", help="Only rows before then, written as for --since. Default: now.")
@click.option("--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write to this file (complete or not at all) instead of standard output.")
@client_options
def audit_export(since, until, output, url, key, home):
    """Write the audit log as JSON lines for a SIEM, oldest first: every column, detail as an
    object, and each row's prev_hash and hash, so the chain can be checked elsewhere.
    The export is itself audited (audit.export)."""
    params = {"since": parse_time(since, "--since"), "until": parse_time(until, "--until")}
    client = make_client(url, key, home)
    partial = output.with_name(output.name + ".partial") if output else None
    try:
        with open(partial, "wb") if partial else contextlib.nullcontext(click.get_binary_stream("stdout")) as sink:
            count = _download(client, {k: v for k, v in params.items() if v is not None}, sink)
    except BaseException:
        if partial:
            partial.unlink(missing_ok=True)
        raise
    if partial:
        os.replace(partial, output)
        click.echo(f"exported {count} rows to {output}", err=True)


def _download(client, params: dict, sink) -> int:
    """Copy the export's lines to `sink` as they arrive; returns how many."""
    import httpx  # as in appliance/admin_client.py

    count = 0
    try:
        with client.http.stream("GET", "/admin/audit/export", params=params,
                                timeout=httpx.Timeout(None, connect=5.0)) as response:
            if not response.is_success:
                response.read()
                raise api_error(response)
            for line in response.iter_lines():
                if not line:
                    continue
                sink.write(line.encode() + b"\n")
                count += 1
    except httpx.TransportError as exc:
        raise AdminApiError(f"cannot reach the gateway at {client.url}{client.origin}: {exc}") from None
    sink.flush()
    return count
