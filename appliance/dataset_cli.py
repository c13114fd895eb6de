"""`appliance datasets ...`: the dataset registry, a client of /admin/datasets."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance.admin_client import AdminApiError, make_client
from appliance.cli_format import emit, size, table, when
from appliance.cli_options import client_options, json_option
from appliance.jobs_cli import submit
from appliance.registry_cli import parse_name_version

FORMAT_CHOICE = click.Choice(["csv", "jsonl", "parquet"])


@click.group()
def datasets() -> None:
    """Dataset registry: upload, versions, quality, PII scan and masking, diff, split."""


@datasets.command("upload")
@click.argument("name")
@click.argument("path")
@click.option("--format", "fmt", type=FORMAT_CHOICE, help="Default: from the file's extension, else its content.")
@click.option("--sha256", help="Expected SHA-256 of the file: a mismatch registers nothing.")
@click.option("--server-path", is_flag=True, help="PATH is on the gateway's machine; nothing is uploaded.")
@click.option("--background", is_flag=True,
              help="With --server-path: queue the import as a job for the worker and return at once.")
@client_options
@json_option()
def datasets_upload(name, path, fmt, sha256, server_path, background, url, key, home, as_json):
    """Register the CSV, JSONL or Parquet file at PATH as the next version of NAME."""
    client = make_client(url, key, home)
    if background:
        if not server_path:
            raise click.UsageError("--background needs --server-path: the worker imports a file already on its machine")
        submit(client, "dataset.import", {"name": name, "path": path, "format": fmt, "sha256": sha256}, as_json)
        return
    if server_path:
        row = client.post(f"/admin/datasets/{name}/versions", {"path": path, "format": fmt, "sha256": sha256})
    else:
        if not Path(path).is_file():
            raise click.BadParameter(f"{path}: no such file", param_hint="PATH")
        row = client.upload(f"/admin/datasets/{name}/upload", Path(path), filename=Path(path).name, format=fmt,
                            sha256=sha256)
    emit(row, as_json, lambda r: f"registered {name} version {r['version']}: {r['rows']} rows ({r['format']}, "
                                 f"{size(r['size'])})\n" + _pii_summary(r["pii"]))


def _pii_summary(report: dict) -> str:
    found = {k: n for k, n in report["counts"].items() if n}
    if not found:
        return f"PII scan: nothing found in {report['rows_scanned']} rows"
    lines = [f"PII scan: {report['rows_with_pii']} of {report['rows_scanned']} rows hold personal data: "
             + ", ".join(f"{n} {k}" for k, n in found.items())]
    lines += [f"  row {s['row']}, {s['path']}: {s['kind']} {s['value']}" for s in report["samples"]]
    lines.append("A masked copy: `appliance datasets mask NAME:VERSION`.")
    return "\n".join(lines)


@datasets.command("versions")
@click.argument("name", required=False)
@client_options
@json_option()
def datasets_versions(name, url, key, home, as_json):
    """List datasets, or the versions of NAME."""
    client = make_client(url, key, home)
    if name is None:
        rows = client.get("/admin/datasets")
        emit(rows, as_json, lambda rs: table([{**r, "created": when(r["created_at"])} for r in rs],
                                             ["name", "versions", "latest", "created"]))
        return
    data = client.get(f"/admin/datasets/{name}")
    rows = [{**v, "size": size(v["size"]), "created": when(v["created_at"]), "pii": v["pii_found"],
             "sha256": v["sha256"][:12] + "…"} for v in data["versions"]]
    emit(data, as_json, lambda _: table(rows, ["version", "format", "rows", "size", "pii", "derivation", "sha256",
                                               "created"]))


@datasets.command("show")
@click.argument("name_version", metavar="NAME:VERSION")
@client_options
@json_option()
def datasets_show(name_version, url, key, home, as_json):
    """Schema, quality report, PII scan and splits of one version."""
    name, version = parse_name_version(name_version)
    row = make_client(url, key, home).get(f"/admin/datasets/{name}/versions/{version}")

    def render(r):
        q = r["quality"]
        lines = [f"{name} version {version}: {r['rows']} rows, {r['format']}, {size(r['size'])}, sha256 {r['sha256']}",
                 f"source: {r['source']}" + (f"   ({r['derivation']})" if r["derivation"] else ""),
                 f"duplicate rows: {q['duplicate_rows']}   empty rows: {q['empty_rows']}", ""]
        columns = [{"column": c["name"], "type": c["type"], "nulls": c["nulls"], "distinct": c["distinct"],
                    **({f"len_{k}": v for k, v in c["length"].items()} if c["length"] else {})} for c in q["columns"]]
        lines.append(table(columns, ["column", "type", "nulls", "distinct", "len_min", "len_p50", "len_p90", "len_max"]))
        lines += ["", _pii_summary(r["pii"])]
        for s in r["splits"]:
            parts = ", ".join(f"{p} {v['rows']}" for p, v in s["parts"].items())
            lines.append(f"split {s['id']} (seed {s['seed']}): {parts}")
        return "\n".join(lines)

    emit(row, as_json, render)


@datasets.command("diff")
@click.argument("name")
@click.argument("a", type=int)
@click.argument("b", type=int)
@click.option("--on", "column", metavar="COLUMN",
              help="Column that identifies a row. Default: `id` when present and unique, else whole rows.")
@client_options
@json_option()
def datasets_diff(name, a, b, column, url, key, home, as_json):
    """Rows added, removed and changed from version A to version B of NAME."""
    data = make_client(url, key, home).get(f"/admin/datasets/{name}/diff", a=a, b=b, key=column)

    def render(d):
        lines = [f"{name} {a} -> {b}: {d['added']} added, {d['removed']} removed, {d['changed']} changed, "
                 f"{d['unchanged']} unchanged (rows {d['rows']['old']} -> {d['rows']['new']}; "
                 f"key {d['key'] or 'none: whole rows'})"]
        if d.get("note"):
            lines.append(d["note"])
        schema = d["schema"]
        for what in ("added", "removed"):
            if schema[what]:
                lines.append(f"columns {what}: " + ", ".join(c["name"] for c in schema[what]))
        for c in schema["type_changed"]:
            lines.append(f"column {c['name']}: {c['old']} -> {c['new']}")
        for what, samples in d["samples"].items():
            if samples:
                lines.append(f"{what}, e.g.: " + "; ".join(json.dumps(s, ensure_ascii=False)[:80] for s in samples))
        return "\n".join(lines)

    emit(data, as_json, render)


@datasets.command("mask")
@click.argument("name_version", metavar="NAME:VERSION")
@client_options
@json_option()
def datasets_mask(name_version, url, key, home, as_json):
    """Register a copy of a version with its PII replaced by placeholders ([EMAIL], [PHONE], ...)."""
    name, version = parse_name_version(name_version)
    row = make_client(url, key, home).post(f"/admin/datasets/{name}/versions/{version}/mask")
    emit(row, as_json, lambda r: f"registered {name} version {r['version']}: {r['derivation']}")


@datasets.command("split")
@click.argument("name_version", metavar="NAME:VERSION")
@click.option("--ratios", default="train=0.8,validation=0.1,test=0.1", show_default=True,
              help="Comma-separated PART=SHARE; the shares add up to 1.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same split.")
@client_options
@json_option()
def datasets_split(name_version, ratios, seed, url, key, home, as_json):
    """Split a version into train, validation and test parts (stored in the registry)."""
    name, version = parse_name_version(name_version)
    parsed = {}
    for item in ratios.split(","):
        part, sep, share = item.partition("=")
        try:
            parsed[part.strip()] = float(share)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected PART=SHARE, e.g. train=0.8", param_hint="--ratios") from None
        if not sep or not part.strip():
            raise click.BadParameter(f"{item!r}: expected PART=SHARE", param_hint="--ratios")
    data = make_client(url, key, home).post(f"/admin/datasets/{name}/versions/{version}/split",
                                            {"ratios": parsed, "seed": seed})
    emit(data, as_json, lambda s: f"split {s['id']} of {name} version {version} (seed {seed}): "
                                  + ", ".join(f"{p} {v['rows']} rows" for p, v in s["parts"].items()))


@datasets.command("download")
@click.argument("name_version", metavar="NAME:VERSION")
@click.option("--split", "split_id", help="A split's id (see `datasets show`); with --part.")
@click.option("--part", help="The split's part, e.g. train.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write it. Default: the served file name.")
@client_options
def datasets_download(name_version, split_id, part, output, url, key, home):
    """Download a version's file, or one part of a split."""
    name, version = parse_name_version(name_version)
    if (split_id is None) != (part is None):
        raise click.UsageError("--split and --part go together")
    path = f"/admin/datasets/{name}/versions/{version}" + (f"/splits/{split_id}/{part}" if split_id else "/file")
    client = make_client(url, key, home)
    with client.http.stream("GET", path) as response:
        if not response.is_success:
            response.read()
            raise AdminApiError(f"{response.json().get('error', {}).get('message', response.text)} "
                                f"(HTTP {response.status_code})")
        disposition = response.headers.get("content-disposition", "")
        served = disposition.split("filename=")[-1].strip('"') if "filename=" in disposition else f"{name}-v{version}"
        target = Path(output or served)
        tmp = target.with_name(f".{target.name}.part")
        with open(tmp, "wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
        tmp.replace(target)
    click.echo(f"wrote {target}")


@datasets.command("delete")
@click.argument("name_version", metavar="NAME:VERSION")
@client_options
def datasets_delete(name_version, url, key, home):
    """Delete a version, its splits and their files."""
    name, version = parse_name_version(name_version)
    make_client(url, key, home).request("DELETE", f"/admin/datasets/{name}/versions/{version}")
    click.echo(f"deleted {name} version {version}")
