"""`appliance login` and `appliance logout`: a password session for the CLI (POST /auth/login).

The session's token is kept in the user's config folder (appliance/admin_client.py
`session_path`, mode 0600) with the gateway's URL; the admin commands use it when no
--key or APPLIANCE_KEY is given.
"""

from __future__ import annotations

import sys

import click

from appliance.admin_client import AdminApiError, AdminClient, gateway_url, read_session, save_session, session_path
from appliance.cli_format import when
from appliance.cli_options import URL_ENV, home_option
from appliance.home import resolve_home


@click.command("login")
@click.option("--user", "-u", "username", help="The appliance user to sign in as. Default: asked.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input instead of asking.")
@click.option("--url", envvar=URL_ENV, show_envvar=True,
              help="The gateway's base URL. Default: the gateway serving the home, else http://127.0.0.1:8080.")
@home_option("Local home: the gateway it runs is signed in to when --url is not given. Default: ./var")
def login_command(username: str | None, password_stdin: bool, url: str | None, home: str | None) -> None:
    """Sign in with a user's password; the admin commands then act as that user until the
    session expires (profile auth.session_ttl_s, 12 h by default) or `appliance logout`.
    The session token is kept in $XDG_CONFIG_HOME/appliance/session (~/.config by default),
    readable by you only."""
    username = username or click.prompt("User")
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else click.prompt("Password", hide_input=True)
    url, origin = gateway_url(url, resolve_home(home))
    answer = AdminClient(url, None, origin=origin).post("/auth/login", {"username": username, "password": password})
    path = save_session(url, answer)
    click.echo(f"signed in to {url} as {answer['user']} ({answer['role']}) until {when(answer['expires_at'])}; "
               f"the session is kept in {path}")


@click.command("logout")
def logout_command() -> None:
    """End the session of `appliance login`: the gateway revokes it and its file is deleted."""
    session, path = read_session(), session_path()
    if session is not None:
        try:
            AdminClient(session["url"], session["token"]).post("/auth/logout")
        except AdminApiError as exc:
            if exc.status != 401:  # 401: revoked or expired already
                raise
    if not path.exists():
        click.echo("not signed in")
        return
    path.unlink()
    click.echo(f"signed out{' of ' + session['url'] if session else ''}")
