"""`appliance tools`: the tools the gateway runs for models, through the admin API (appliance/tools.py)."""

from __future__ import annotations

import json

import click
import yaml

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import MappingFile, client_options, json_option


@click.group("tools")
def tools_group() -> None:
    """Tools the gateway runs when a model calls them: sandboxed commands or MCP servers' tools.
    A chat request names the ones it may use ("server_tools": [NAME, ...])."""


@tools_group.command("add")
@click.argument("name")
@click.argument("body", metavar="FILE", type=MappingFile("description, parameters, and command or mcp"))
@click.option("--replace", is_flag=True, help="Replace the tool of that name.")
@client_options
@json_option()
def tools_add(name, body, replace, url, key, home, as_json):
    """Register tool NAME from FILE (YAML or JSON: description, parameters, and command or mcp)."""
    client = make_client(url, key, home)
    tool = client.request("PUT" if replace else "POST", f"/admin/tools/{name}", json=body)
    emit(tool, as_json, lambda t: f"tool {name}: {_how(t)}")


def _how(tool: dict) -> str:
    if tool["kind"] == "mcp":
        return f"MCP {tool['mcp']['url']} ({tool['mcp']['tool'] or tool['name']})"
    c = tool["command"]
    return (f"{' '.join(c['argv'])} (sandboxed: {c['timeout_s']:g} s, {c['cpu_s']} s CPU, {c['memory_mb']} MB, "
            f"{'network' if c['network'] else 'no network'})")


@tools_group.command("list")
@client_options
@json_option()
def tools_list(url, key, home, as_json):
    """The registered tools."""
    rows = make_client(url, key, home).get("/admin/tools")
    emit(rows, as_json, lambda rs: table([{**r, "runs": _how(r), "updated": when(r["updated_at"])} for r in rs],
                                         ["name", "kind", "runs", "description", "updated"]))


@tools_group.command("show")
@click.argument("name")
@client_options
@json_option()
def tools_show(name, url, key, home, as_json):
    """One tool: what the model sees (description, parameters) and how it runs."""
    tool = make_client(url, key, home).get(f"/admin/tools/{name}")
    emit(tool, as_json, lambda t: yaml.safe_dump({k: t[k] for k in ("description", "parameters", "command", "mcp")
                                                  if t[k] is not None}, allow_unicode=True, sort_keys=False).rstrip())


@tools_group.command("call")
@click.argument("name")
@click.argument("arguments", default="{}", metavar="[ARGUMENTS_JSON]")
@client_options
@json_option()
def tools_call(name, arguments, url, key, home, as_json):
    """Run tool NAME once with ARGUMENTS (a JSON object), as the gateway would for a model."""
    try:
        parsed = json.loads(arguments)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="ARGUMENTS_JSON") from None
    answer = make_client(url, key, home).post(f"/admin/tools/{name}/call", {"arguments": parsed})
    emit(answer, as_json, lambda a: a["result"].rstrip("\n") if a["ok"] else
         f"failed after {a['seconds']:g} s: {a['result']}")
    if not answer["ok"]:
        raise SystemExit(1)


@tools_group.command("delete")
@click.argument("name")
@client_options
def tools_delete(name, url, key, home):
    """Remove a tool: requests that name it are refused."""
    make_client(url, key, home).request("DELETE", f"/admin/tools/{name}")
    click.echo(f"deleted tool {name}")
