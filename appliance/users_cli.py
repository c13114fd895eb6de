"""`appliance users ...` and `appliance teams ...`: clients of /admin/users and /admin/teams.

Membership is a team's: `teams add-member TEAM USER` and `teams remove-member TEAM USER`.
Teams take the same limit and policy options as keys (appliance/keys_cli.py).
"""

from __future__ import annotations

import sys

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import client_options, json_option
from appliance.keys_cli import describe_settings, limits_text, policy_text, settings_options, spent_cell, with_spend
from appliance.users import ROLES

password_stdin_option = click.option(
    "--password-stdin", is_flag=True,
    help="Read the password from standard input (one line) instead of asking for it.")


def _read_password(from_stdin: bool, *, required: bool) -> str | None:
    """From stdin, else asked on a terminal (twice); without a terminal, none unless `required`."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        if required:
            raise click.UsageError("no terminal to ask for the password on: pass it with --password-stdin")
        return None
    prompt = "Password" if required else "Password (empty: none, the user signs in with keys only)"
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True, default="" if not required else None,
                        show_default=False) or None


def _user_line(u: dict) -> str:
    return f"{u['id']} {u['name']!r} ({u['role']}, {u['state']})"


# --- users -----------------------------------------------------------------------------


@click.group()
def users() -> None:
    """Create, list, show, update and delete users."""


@users.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the user may do: at most your role.")
@click.option("--email", help="Their email address.")
@password_stdin_option
@client_options
@json_option()
def users_create(name, role, email, password_stdin, url, key, home, as_json):
    """Create the user NAME. Their password (for `appliance login`) is asked for on a terminal,
    or read with --password-stdin; without either the user has none and uses keys."""
    body = {"name": name, "role": role, "email": email, "password": _read_password(password_stdin, required=False)}
    created = make_client(url, key, home).post("/admin/users", {k: v for k, v in body.items() if v is not None})
    emit(created, as_json, lambda u: "created " + _user_line(u) + ("" if u["has_password"] else ", no password"))


@users.command("list")
@client_options
@json_option()
def users_list(url, key, home, as_json):
    """List users (never their passwords)."""
    rows = make_client(url, key, home).get("/admin/users")
    emit(rows, as_json, lambda rs: table(
        [{**r, "password": "yes" if r["has_password"] else "no", "created": when(r["created_at"])} for r in rs],
        ["id", "name", "role", "email", "password", "state", "created"]))


@users.command("show")
@click.argument("user")
@client_options
@json_option()
def users_show(user, url, key, home, as_json):
    """Show USER (name or id) with their teams and active keys."""

    def render(u):
        teams = ", ".join(t["name"] for t in u["teams"]) or "none"
        keys = table(u["keys"], ["id", "name", "role", "kind", "team_id", "expires_at"])
        return f"{_user_line(u)}, email {u['email'] or '-'}\nteams: {teams}\nkeys:\n{keys}"

    emit(make_client(url, key, home).get(f"/admin/users/{user}"), as_json, render)


@users.command("update")
@click.argument("user")
@click.option("--name", help="A new name.")
@click.option("--role", type=click.Choice(ROLES), help="A new role: at most yours. Their keys act with at most it.")
@click.option("--email", help="A new email address; 'off' removes it.")
@click.option("--disable/--enable", "disabled", default=None,
              help="Refuse (or allow again) the user's keys and sessions, within a second.")
@client_options
@json_option()
def users_update(user, name, role, email, disabled, url, key, home, as_json):
    """Change USER's name, role, email, or disable them; what is not given stays."""
    body = {k: v for k, v in {"name": name, "role": role, "disabled": disabled}.items() if v is not None}
    if email is not None:
        body["email"] = None if email == "off" else email
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    updated = make_client(url, key, home).request("PATCH", f"/admin/users/{user}", json=body)
    emit(updated, as_json, lambda u: "updated " + _user_line(u))


@users.command("set-password")
@click.argument("user")
@password_stdin_option
@client_options
def users_set_password(user, password_stdin, url, key, home):
    """Set USER's password (asked for, or read with --password-stdin); their sessions end."""
    password = _read_password(password_stdin, required=True)
    updated = make_client(url, key, home).post(f"/admin/users/{user}/password", {"password": password})
    click.echo(f"password set for {updated['name']}; their sessions are signed out")


@users.command("delete")
@click.argument("user")
@client_options
@json_option()
def users_delete(user, url, key, home, as_json):
    """Delete USER and their team memberships; their keys and sessions are revoked."""
    deleted = make_client(url, key, home).request("DELETE", f"/admin/users/{user}")
    emit(deleted, as_json, lambda u: f"deleted {_user_line(u)}; revoked keys: {', '.join(u['revoked_keys']) or 'none'}")


# --- teams -----------------------------------------------------------------------------


@click.group()
def teams() -> None:
    """Create, list, show, update and delete teams, and manage their members."""


def _render_team(t: dict) -> str:
    return f"{t['id']} {t['name']!r}\n" + describe_settings(t)


@teams.command("create")
@click.argument("name")
@settings_options
@client_options
@json_option()
def teams_create(name, settings, url, key, home, as_json):
    """Create the team NAME with the limits its keys share and the policy its requests follow."""
    created = make_client(url, key, home).post("/admin/teams", {"name": name} | settings)
    emit(created, as_json, lambda t: "created " + _render_team(t))


@teams.command("list")
@client_options
@json_option()
def teams_list(url, key, home, as_json):
    """List teams with their limits, policies, and what each budget has spent this period."""
    rows = make_client(url, key, home).get("/admin/teams")
    emit(rows, as_json, lambda rs: table(
        [{**r, "limits": limits_text(r["limits"]), "policy": policy_text(r["policy"]),
          "spent": spent_cell(r.get("spend"))} for r in rs],
        ["id", "name", "spent", "limits", "policy"]))


@teams.command("show")
@click.argument("team")
@client_options
@json_option()
def teams_show(team, url, key, home, as_json):
    """Show TEAM (name or id) with its members and active keys, and what its budget and theirs have
    spent this period."""

    def render(t):
        members = ", ".join(f"{m['name']} ({m['role']})" for m in t["members"]) or "none"
        keys = table([{**k, "spent": spent_cell(k.get("spend"))} for k in t["keys"]],
                     ["id", "name", "role", "user_id", "expires_at", "spent"])
        return f"{with_spend(_render_team(t), t)}\nmembers: {members}\nkeys:\n{keys}"

    emit(make_client(url, key, home).get(f"/admin/teams/{team}"), as_json, render)


@teams.command("update")
@click.argument("team")
@click.option("--name", help="A new name.")
@settings_options
@client_options
@json_option()
def teams_update(team, name, settings, url, key, home, as_json):
    """Change TEAM's name, limits or policy; what is not given stays. The gateway applies it within a second."""
    body = ({"name": name} if name else {}) | settings
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    updated = make_client(url, key, home).request("PATCH", f"/admin/teams/{team}", json=body)
    emit(updated, as_json, lambda t: "updated " + _render_team(t))


@teams.command("delete")
@click.argument("team")
@click.option("--force", is_flag=True, help="Delete even with active keys, revoking them.")
@client_options
@json_option()
def teams_delete(team, force, url, key, home, as_json):
    """Delete TEAM and its memberships; refused while it has active keys, unless --force."""
    deleted = make_client(url, key, home).request("DELETE", f"/admin/teams/{team}", params={"force": force})
    emit(deleted, as_json, lambda t: f"deleted {t['id']} {t['name']!r}; revoked keys: "
                                     f"{', '.join(t['revoked_keys']) or 'none'}")


@teams.command("add-member")
@click.argument("team")
@click.argument("user")
@client_options
def teams_add_member(team, user, url, key, home):
    """Make USER a member of TEAM (their keys may then be billed to it)."""
    added = make_client(url, key, home).post(f"/admin/teams/{team}/members", {"user": user})
    click.echo(f"{added['user']['name']} is a member of {added['team']['name']}")


@teams.command("remove-member")
@click.argument("team")
@click.argument("user")
@client_options
def teams_remove_member(team, user, url, key, home):
    """End USER's membership of TEAM; refused while they have active keys billed to it."""
    removed = make_client(url, key, home).request("DELETE", f"/admin/teams/{team}/members/{user}")
    click.echo(f"{removed['user']['name']} is no longer a member of {removed['team']['name']}")
