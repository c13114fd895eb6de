"""`appliance routes ...`: a client of /admin/routes (docs/routing.md)."""

from __future__ import annotations

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import client_options, json_option


def _targets(ctx, param, values: tuple[str, ...]) -> list[dict]:
    """MODEL=WEIGHT, or a bare MODEL for a weight of 1."""
    targets = []
    for text in values:
        model, sep, weight = text.partition("=")
        if sep and not weight.isdigit():
            raise click.BadParameter(f"{text!r}: the weight {weight!r} is not a whole number (MODEL=WEIGHT, e.g. "
                                     f"{model or 'MODEL'}=95)")
        targets.append({"model": model, "weight": int(weight) if sep else 1})
    return targets


def _shadow(ctx, param, value: str | None) -> dict | None:
    """MODEL=PERCENT: the share of the route's requests copied to MODEL."""
    if value is None:
        return None
    model, sep, percent = value.partition("=")
    try:
        share = float(percent)
    except ValueError:
        share = None
    if not sep or not model or share is None:
        raise click.BadParameter(f"{value!r}: expected MODEL=PERCENT, e.g. chat-v3=10")
    return {"model": model, "percent": share}


def _shares(route: dict) -> str:
    return " / ".join(f"{t['model']} {t['share']:g}%" for t in route["targets"])


@click.group()
def routes() -> None:
    """Routes: a name clients ask for, served by weighted targets (a canary: 95/5 between two
    models) with fallbacks. A change applies within a second, without a restart."""


@routes.command("list")
@client_options
@json_option()
def routes_list(url, key, home, as_json):
    """List routes: targets with their shares, fallbacks, and SOURCE (profile or admin)."""
    rows = make_client(url, key, home).get("/admin/routes")
    emit(rows, as_json, lambda rs: table(
        [{**r, "targets": _shares(r), "fallbacks": ", ".join(r["fallbacks"]) or None} for r in rs],
        ["name", "targets", "fallbacks", "source"]))


@routes.command("show")
@click.argument("name")
@client_options
@json_option()
def routes_show(name, url, key, home, as_json):
    """Show the route NAME with the state of each model in the gateway now.

    STATE is ready, unavailable or not served; '-' until the gateway serves the route."""

    def render(r):
        live = r.get("live", {"targets": [], "fallbacks": []})
        states = {e["model"]: e["state"] for e in live["targets"] + live["fallbacks"]}
        rows = [{"kind": "target", "model": t["model"], "weight": t["weight"], "share": f"{t['share']:g}%",
                 "state": states.get(t["model"])} for t in r["targets"]]
        rows += [{"kind": f"fallback {i}", "model": m, "state": states.get(m)} for i, m in enumerate(r["fallbacks"], 1)]
        if r["shadow"]:
            rows.append({"kind": "shadow", "model": r["shadow"]["model"], "share": f"{r['shadow']['percent']:g}%"})
        head = f"{r['name']} ({r['source']}"
        if r["source"] == "admin":
            head += f", set {when(r['updated_at'])} by {r['updated_by'] or '-'}"
            head += ", replacing the profile's route" if r["replaces_profile_route"] else ""
        out = head + ")\n" + table(rows, ["kind", "model", "weight", "share", "state"])
        if r.get("shadow_results"):
            out += "\nshadow traffic, last 24 h:\n" + table(r["shadow_results"], [
                "primary_model", "shadow_model", "requests", "shadow_errors", "similarity", "primary_ms", "shadow_ms",
                "primary_tokens", "shadow_tokens"])
        return out

    emit(make_client(url, key, home).get(f"/admin/routes/{name}"), as_json, render)


@routes.command("set")
@click.argument("name")
@click.option("--target", "targets", multiple=True, required=True, callback=_targets, metavar="MODEL[=WEIGHT]",
              help="A served model and its weight (default 1); repeat for each, e.g. --target v1=95 --target v2=5.")
@click.option("--fallback", "fallbacks", multiple=True, metavar="MODEL",
              help="A model tried when the targets fail before answering; repeat, in the order to try them.")
@click.option("--shadow", callback=_shadow, metavar="MODEL=PERCENT",
              help="Copy PERCENT of the answered requests to MODEL, off the client's path, and compare the answers "
                   "(`routes show` summarises them).")
@client_options
@json_option()
def routes_set(name, targets, fallbacks, shadow, url, key, home, as_json):
    """Create or replace the route NAME.

    It replaces the profile's route NAME, if any, until deleted. The gateway serves it within
    a second, without a restart."""
    route = make_client(url, key, home).request("PUT", f"/admin/routes/{name}",
                                                json={"targets": targets, "fallbacks": list(fallbacks),
                                                      "shadow": shadow})
    emit(route, as_json,
         lambda r: f"set route {r['name']}: {_shares(r)}; fallbacks: {', '.join(r['fallbacks']) or 'none'}")


@routes.command("delete")
@click.argument("name")
@client_options
@json_option()
def routes_delete(name, url, key, home, as_json):
    """Delete the route NAME made with `set`.

    The profile's route NAME, if any, is served again, within a second."""
    deleted = make_client(url, key, home).request("DELETE", f"/admin/routes/{name}")
    emit(deleted, as_json, lambda d: f"deleted route {d['name']}"
                                     + ("; the profile's route is served again" if d["serving"] else ""))
