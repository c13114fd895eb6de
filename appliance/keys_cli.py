"""`appliance keys ...`: API keys through the admin API (/admin/keys), so every change is
authorised and audited by the gateway; `keys bootstrap` alone works on the home directly."""

from __future__ import annotations

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import client_options, home_option, json_option
from appliance.errors import StateError
from appliance.home import admin_key_path, resolve_home, state_db_path
from appliance.keys import ROLES


@click.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="developer", show_default=True,
              help="What the key may do (metrics: read /metrics, /readyz and /schema, nothing else); "
                   "at most the role of the key that creates it.")
@click.option("--expires-in", metavar="DURATION", help="Expire after this long, e.g. 30d, 12h.")
@client_options
@json_option()
def keys_create(name, role, expires_in, url, key, home, as_json):
    """Create a key named NAME and print its secret (shown only this once)."""
    created = make_client(url, key, home).post("/admin/keys", {"name": name, "role": role, "expires_in": expires_in})

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
    """List API keys (never their secrets)."""
    rows = make_client(url, key, home).get("/admin/keys", include_revoked=include_revoked or None)
    emit(rows, as_json, lambda rs: table(
        [{**r, "prefix": r["prefix"] + "…", "created": when(r["created_at"]), "expires": when(r["expires_at"])}
         for r in rs], ["id", "name", "role", "prefix", "state", "created", "expires"]))


@keys.command("revoke")
@click.argument("key_id")
@client_options
def keys_revoke(key_id, url, key, home):
    """Revoke the key with id (or displayed prefix) KEY_ID; the gateway refuses it within a second."""
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
