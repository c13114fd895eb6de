"""`appliance console`: the admin console, against the local gateway or one on the LAN."""

from __future__ import annotations

import click

from appliance.cli_options import client_options
from tui.views import COMMANDS

VIEW_NAMES = [command.name for command in COMMANDS]


@click.command("console")
@client_options
@click.option("--view", type=click.Choice(VIEW_NAMES), default="dashboard", show_default=True,
              help="The view it opens on.")
@click.option("--refresh", type=click.FloatRange(0.5, 60), default=2.0, show_default=True, metavar="SECONDS",
              help="How often the dashboard refreshes.")
def console_command(url: str | None, key: str | None, home: str | None, view: str, refresh: float) -> None:
    """Open the admin console: a live dashboard and a view per domain (models, routes,
    datasets, jobs, keys, users, teams, usage, policies, audit) in the terminal.

    It talks to the admin API alone, so it works the same from a laptop on the LAN
    (--url http://HOST:8080 --key KEY): the gateway authorises and audits what it does.
    Press ? for the keys of a view, : to jump to another view, ctrl+q to quit.
    """
    from appliance.admin_client import connection
    from tui.app import ConsoleApp
    from tui.client import Api

    url, key, origin = connection(url, key, home)
    ConsoleApp(Api(url, key, origin=origin), start=view, refresh_s=refresh).run()
