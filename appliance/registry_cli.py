"""`appliance models ...` (registry and deployments): clients of /admin."""

from __future__ import annotations

import time
from pathlib import Path

import click

from appliance.admin_client import AdminApiError, make_client
from appliance.cli_format import emit, size, table, when
from appliance.cli_options import client_options, json_option
from appliance.jobs_cli import submit

def parse_name_version(text: str) -> tuple[str, int]:
    name, sep, version = text.rpartition(":")
    if not sep or not version.isdigit():
        raise click.BadParameter(f"{text!r}: expected NAME:VERSION, e.g. smollm2:1")
    return name, int(version)


# --- models -----------------------------------------------------------------------------


@click.command("register")
@click.argument("name")
@click.argument("path")
@click.option("--sha256", help="Expected SHA-256 of the file: a mismatch registers nothing.")
@click.option("--server-path", is_flag=True,
              help="PATH is on the gateway's machine (a GGUF file or an HF directory); nothing is uploaded.")
@click.option("--presigned", is_flag=True,
              help="Upload straight to the object store through a presigned URL (it must be reachable from here).")
@click.option("--background", is_flag=True,
              help="With --server-path: queue the import as a job for the worker and return at once.")
@client_options
@json_option()
def models_register(name, path, sha256, server_path, presigned, background, url, key, home, as_json):
    """Register the model at PATH as the next version of NAME.

    By default the file is uploaded through the gateway; use --server-path for a file or
    HF directory already on the gateway's machine, and add --background for a large one.
    """
    client = make_client(url, key, home)
    if background:
        if not server_path:
            raise click.UsageError("--background needs --server-path: the worker imports a file already on its machine")
        submit(client, "model.import", {"name": name, "path": path, "sha256": sha256}, as_json)
        return
    if server_path:
        row = client.post(f"/admin/models/{name}/versions", {"path": path, "sha256": sha256})
    else:
        file = Path(path)
        if file.is_dir():
            raise click.BadParameter("a directory cannot be uploaded: copy it to the gateway's machine and use "
                                     "--server-path", param_hint="PATH")
        if not file.is_file():
            raise click.BadParameter(f"{path}: no such file", param_hint="PATH")
        if presigned:
            row = _presigned_register(client, name, file, sha256)
        else:
            row = client.upload(f"/admin/models/{name}/upload", file, filename=file.name, sha256=sha256)
    emit(row, as_json, lambda r: f"registered {name} version {r['version']} ({r['format']}, {size(r['size'])}, "
                                 f"sha256 {r['sha256'][:12]}…)")


def _presigned_register(client, name: str, file: Path, sha256: str | None) -> dict:
    import httpx  # as in appliance/admin_client.py

    upload = client.post("/admin/uploads", {"bucket": "models"})
    with open(file, "rb") as f:
        try:
            response = httpx.put(upload["url"], content=f, headers=upload["headers"], timeout=3600)
        except httpx.TransportError as exc:
            raise AdminApiError(f"cannot reach the object store at the presigned URL: {exc}; "
                                "upload through the gateway instead (without --presigned)") from None
    if not response.is_success:
        raise AdminApiError(f"the object store refused the upload (HTTP {response.status_code}): {response.text[:200]}")
    return client.post(f"/admin/models/{name}/versions",
                       {"upload_key": upload["upload_key"], "filename": file.name, "sha256": sha256})


@click.command("versions")
@click.argument("name", required=False)
@client_options
@json_option()
def models_versions(name, url, key, home, as_json):
    """List registered models, or the versions of NAME."""
    client = make_client(url, key, home)
    if name is None:
        rows = client.get("/admin/models")
        emit(rows, as_json, lambda rs: table(
            [{**r, "deployed_as": ", ".join(r["deployed_as"]) or None, "created": when(r["created_at"])} for r in rs],
            ["name", "versions", "latest", "deployed_as", "created"]))
        return
    data = client.get(f"/admin/models/{name}")
    rows = [{"version": v["version"], "format": v["format"], "size": size(v["size"]), "sha256": v["sha256"][:12] + "…",
             "quantization": v["card"].get("quantization"), "deployed_as": ", ".join(v["deployed_as"]) or None,
             "source": v["source"], "created": when(v["created_at"])} for v in data["versions"]]
    emit(data, as_json, lambda _: table(rows, ["version", "format", "size", "quantization", "sha256", "deployed_as",
                                                "source", "created"]))


@click.command("show")
@click.argument("name_version", metavar="NAME:VERSION")
@client_options
@json_option()
def models_show(name_version, url, key, home, as_json):
    """Show one version: its model card and files."""
    name, version = parse_name_version(name_version)
    row = make_client(url, key, home).get(f"/admin/models/{name}/versions/{version}")

    def render(r):
        lines = [f"{name} version {version}  ({r['format']}, {size(r['size'])}, sha256 {r['sha256']})",
                 f"source: {r['source']}   registered {when(r['created_at'])}",
                 f"deployed as: {', '.join(r['deployed_as']) or '-'}"]
        if r["gate"]:
            lines.append(f"quality gate: {r['gate']['state']}: {r['gate']['reason']}")
        lines += ["", "card:"]
        for field, value in r["card"].items():
            edited = " (edited)" if field in r["edited_fields"] else ""
            text = value if not isinstance(value, str) or len(value) < 100 else value[:97] + "..."
            lines.append(f"  {field}{edited}: {text}")
        lines += ["", "files:"] + [f"  {f['path']}  {size(f['size'])}  {f['sha256'][:12]}…" for f in r["files"]]
        return "\n".join(lines)

    emit(row, as_json, render)


@click.command("edit-card")
@click.argument("name_version", metavar="NAME:VERSION")
@click.option("--set", "assignments", multiple=True, metavar="FIELD=VALUE",
              help="Set an editable field (description, license, intended_use, limitations, notes); repeatable.")
@click.option("--tags", help="Comma-separated tags.")
@click.option("--unset", multiple=True, metavar="FIELD", help="Drop an edit, showing the extracted value again.")
@client_options
@json_option()
def models_edit_card(name_version, assignments, tags, unset, url, key, home, as_json):
    """Edit the model card of one version (the files and extracted facts stay as they are)."""
    name, version = parse_name_version(name_version)
    edits: dict = {}
    for assignment in assignments:
        field, sep, value = assignment.partition("=")
        if not sep:
            raise click.BadParameter(f"{assignment!r}: expected FIELD=VALUE", param_hint="--set")
        edits[field] = value
    if tags is not None:
        edits["tags"] = [t.strip() for t in tags.split(",") if t.strip()]
    edits.update({field: None for field in unset})
    if not edits:
        raise click.UsageError("nothing to change: give --set, --tags or --unset")
    row = make_client(url, key, home).request("PATCH", f"/admin/models/{name}/versions/{version}/card", json=edits)
    emit(row, as_json, lambda r: f"card of {name} version {version} updated: {', '.join(sorted(edits))}")


@click.command("compare")
@click.argument("name")
@click.argument("a", type=int)
@click.argument("b", type=int)
@click.option("--all", "show_all", is_flag=True, help="Show fields that are the same too.")
@client_options
@json_option()
def models_compare(name, a, b, show_all, url, key, home, as_json):
    """Compare versions A and B of NAME side by side."""
    data = make_client(url, key, home).get(f"/admin/models/{name}/compare", a=a, b=b)

    def short(v):
        text = "-" if v is None else str(v)
        return text if len(text) <= 48 else text[:45] + "..."

    rows = [{"field": f["field"], f"v{a}": short(f["a"]), f"v{b}": short(f["b"]), "differs": "" if f["same"] else "*"}
            for f in data["fields"] if show_all or not f["same"]]
    emit(data, as_json, lambda _: table(rows, ["field", f"v{a}", f"v{b}", "differs"]) if rows else "the versions' cards are the same")


@click.command("delete")
@click.argument("name_version", metavar="NAME:VERSION")
@client_options
def models_delete(name_version, url, key, home):
    """Delete one version and its files (refused while it is deployed)."""
    name, version = parse_name_version(name_version)
    make_client(url, key, home).request("DELETE", f"/admin/models/{name}/versions/{version}")
    click.echo(f"deleted {name} version {version}")


@click.command("deploy")
@click.argument("name_version", metavar="NAME:VERSION")
@click.option("--as", "served_name", help="The model id clients use. Default: NAME.")
@click.option("--replicas", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--context-length", type=click.IntRange(128), help="Default: the model's, at most 4096.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it serves (or fails).")
@click.option("--timeout", type=float, default=300, show_default=True, help="Seconds to wait.")
@click.option("--force", is_flag=True, help="Deploy a version that has not passed its model's quality gate (audited).")
@client_options
@json_option()
def models_deploy(name_version, served_name, replicas, context_length, wait, timeout, force, url, key, home, as_json):
    """Serve a registered version; the gateway picks it up without a restart. A gated model's
    version must have passed its quality gate (`appliance models gate`)."""
    name, version = parse_name_version(name_version)
    client = make_client(url, key, home)
    row = client.post("/admin/deployments", {"model": name, "version": version, "name": served_name,
                                             "replicas": replicas, "context_length": context_length, "force": force})
    deadline = time.monotonic() + timeout
    while wait and row["state"] in ("pending", "starting") and time.monotonic() < deadline:
        time.sleep(0.5)
        row = client.get(f"/admin/deployments/{row['name']}")
    if wait and row["state"] == "failed":
        raise AdminApiError(f"deployment {row['name']} failed: {row['message']}")
    while wait and row["state"] == "running" and time.monotonic() < deadline:  # the gateway polls every second
        if row["name"] in [m["id"] for m in client.get("/v1/models")["data"]]:
            break
        time.sleep(0.25)
    emit(row, as_json, lambda r: f"{name} version {version} is {r['state']} as {r['name']}"
                                 + ("" if r["state"] == "running" else f" ({r['message'] or 'waiting'})"))


@click.command("undeploy")
@click.argument("served_name", metavar="NAME")
@client_options
def models_undeploy(served_name, url, key, home):
    """Stop serving the deployment NAME (the gateway drops it within a second)."""
    make_client(url, key, home).request("DELETE", f"/admin/deployments/{served_name}")
    click.echo(f"undeploying {served_name}")


@click.command("deployments")
@client_options
@json_option()
def models_deployments(url, key, home, as_json):
    """List deployments of registered versions and their state."""
    rows = make_client(url, key, home).get("/admin/deployments")
    emit(rows, as_json, lambda rs: table(
        [{**r, "endpoints": len(r["endpoints"]), "since": when(r["updated_at"])} for r in rs],
        ["name", "model", "version", "engine", "replicas", "state", "message", "since"]))


REGISTRY_COMMANDS = [models_register, models_versions, models_show, models_edit_card, models_compare, models_delete,
                     models_deploy, models_undeploy, models_deployments]
