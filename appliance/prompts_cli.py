"""`appliance prompts`: prompt templates through the admin API (appliance/prompts.py)."""

from __future__ import annotations

import json

import click
import yaml

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import MappingFile, client_options, json_option, name_and_version


@click.group()
def prompts() -> None:
    """Prompt templates: versioned Jinja2 templates with declared variables, rendered by the
    gateway when a chat request names one ("template": {"name", "variables"}), split between
    versions by weight (A/B)."""


@prompts.command("push")
@click.argument("name")
@click.argument("body", metavar="FILE", type=MappingFile("system, user, variables and description"))
@client_options
@json_option()
def prompts_push(name, body, url, key, home, as_json):
    """Add FILE (YAML or JSON: system, user, variables, description) as the next version of NAME."""
    row = make_client(url, key, home).post(f"/admin/prompts/{name}/versions", body)
    emit(row, as_json, lambda r: f"{name} version {r['version']}: variables "
                                 f"{', '.join(v['name'] for v in r['variables']) or 'none'}")


@prompts.command("list")
@client_options
@json_option()
def prompts_list(url, key, home, as_json):
    """Templates, their versions and A/B weights."""
    rows = make_client(url, key, home).get("/admin/prompts")
    emit(rows, as_json, lambda rs: table(
        [{**r, "ab": _weights(r["ab"]) or f"latest ({r['latest']})", "updated": when(r["updated_at"])} for r in rs],
        ["name", "versions", "ab", "updated"]))


@prompts.command("show")
@click.argument("name", metavar="NAME[:VERSION]")
@client_options
@json_option()
def prompts_show(name, url, key, home, as_json):
    """A template's versions, or one version's texts and variables."""
    name, version = name_and_version(name, "NAME")
    client = make_client(url, key, home)
    if version is None:
        template = client.get(f"/admin/prompts/{name}")
        emit(template, as_json, lambda t: f"{name}: A/B {_weights(t['ab']) or 'none (the latest version)'}\n" + table(
            [{"version": v["version"], "variables": ", ".join(x["name"] for x in v["variables"]) or "-",
              "created": when(v["created_at"]), "description": v["description"]} for v in t["versions"]],
            ["version", "variables", "created", "description"]))
        return
    row = client.get(f"/admin/prompts/{name}/versions/{version}")
    emit(row, as_json, lambda r: yaml.safe_dump({k: r[k] for k in ("system", "user", "variables", "description")
                                                 if r[k]}, allow_unicode=True, sort_keys=False).rstrip())


@prompts.command("ab")
@click.argument("name")
@click.argument("weights", nargs=-1, metavar="VERSION=WEIGHT...")
@client_options
@json_option()
def prompts_ab(name, weights, url, key, home, as_json):
    """Split requests that name no version: `ab support 1=90 2=10`; none sends all to the latest."""
    parsed = {}
    for item in weights:
        version, sep, weight = item.partition("=")
        try:
            parsed[version] = float(weight)
        except ValueError:
            sep = ""
        if not sep:
            raise click.BadParameter(f"{item!r}: write VERSION=WEIGHT, e.g. 2=10", param_hint="WEIGHTS")
    row = make_client(url, key, home).request("PUT", f"/admin/prompts/{name}/ab", json={"weights": parsed})
    emit(row, as_json, lambda t: f"{name}: A/B {_weights(t['ab']) or 'none (the latest version)'}")


@prompts.command("render")
@click.argument("name", metavar="NAME[:VERSION]")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE",
              help="A variable; VALUE is read as JSON where it parses (42, true, [1, 2]), else as text.")
@client_options
@json_option()
def prompts_render(name, variables, url, key, home, as_json):
    """What a request naming the template gets: the version chosen and the rendered texts."""
    name, version = name_and_version(name, "NAME")
    values = {}
    for item in variables:
        var, sep, value = item.partition("=")
        if not sep or not var:
            raise click.BadParameter(f"{item!r}: write NAME=VALUE", param_hint="--var")
        try:
            values[var] = json.loads(value)
        except ValueError:
            values[var] = value
    row = make_client(url, key, home).post(f"/admin/prompts/{name}/render", {"version": version, "variables": values})
    emit(row, as_json, lambda r: "\n".join([f"{name} version {r['version']}"]
                                           + [f"--- {part}\n{r[part].rstrip()}" for part in ("system", "user") if part in r]))


@prompts.command("delete")
@click.argument("name")
@client_options
def prompts_delete(name, url, key, home):
    """Delete a template and every version of it."""
    make_client(url, key, home).request("DELETE", f"/admin/prompts/{name}")
    click.echo(f"deleted prompt template {name}")


def _weights(ab: dict) -> str:
    total = sum(ab.values())
    return ", ".join(f"v{v} {w / total:.0%}" for v, w in ab.items()) if total else ""
