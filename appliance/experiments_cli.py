"""`appliance experiments ...` and `appliance runs ...`: experiment tracking through the admin
API (/admin/experiments, /admin/runs). A run is a fine-tuning job; its id is the job's."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when, write_output
from appliance.cli_options import client_options, json_option


def _short(value) -> str:
    """A value for a table: floats to 4 significant digits (--json has them whole), long ones cut."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "-" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _values(values: dict | None) -> str:
    """loss=0.51 tokens_per_s=812: a run's metrics on one line."""
    return " ".join(f"{k}={_short(v)}" for k, v in (values or {}).items()) or "-"


def _param(text: str) -> tuple[str, str]:
    path, sep, value = text.partition("=")
    if not sep or not path:
        raise click.BadParameter(f"{text!r}: write PATH=VALUE, e.g. lora.rank=8", param_hint="--param")
    return path, value


@click.group()
def experiments() -> None:
    """Experiments: the groups that fine-tuning runs are recorded in (see `appliance runs`)."""


@experiments.command("list")
@client_options
@json_option()
def experiments_list(url, key, home, as_json):
    """Experiments, with how many runs each has and when the last began."""
    rows = make_client(url, key, home).get("/admin/experiments")
    emit(rows, as_json, lambda rs: table(
        [{**r, "created": when(r["created_at"]), "last_run": when(r["last_run_at"])} for r in rs],
        ["name", "runs", "last_run", "created", "description"]))


@click.group()
def runs() -> None:
    """Runs of fine-tuning jobs: their parameters, metrics per step, artifacts and links;
    search, show, compare side by side, tag and export them."""


@runs.command("list")
@click.option("--experiment", help="Only runs of this experiment.")
@click.option("--tag", help="Only runs with this tag.")
@click.option("--param", "params", multiple=True, metavar="PATH=VALUE",
              help="Only runs whose parameter at PATH (dotted: lora.rank) has VALUE, read as JSON when it parses "
                   "(8, 0.0002, true, null) and as text otherwise. Repeat for more.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True)
@client_options
@json_option()
def runs_list(experiment, tag, params, limit, url, key, home, as_json):
    """Runs, newest first."""
    query = {"experiment": experiment, "tag": tag, "limit": limit,
             **{f"param.{path}": value for path, value in map(_param, params)}}
    rows = make_client(url, key, home).get("/admin/runs", **query)
    emit(rows, as_json, lambda rs: table(
        [{**r, "tags": " ".join(r["tags"]) or None, "created": when(r["created_at"]),
          "final": _values(r["final_metrics"])} for r in rs],
        ["id", "experiment", "state", "tags", "created", "final"]))


def _show(run: dict) -> str:
    links = run["links"]

    def version(v: dict | None, what: str) -> str:
        if v is None:
            return "-"
        return f"{v[what]} version {v['version']} ({v['id']})" if what in v else f"{v['id']} (deleted)"

    lines = [
        f"run         {run['id']}",
        f"experiment  {run['experiment']}",
        f"state       {run['state']}" + (f"  ({run['job']['message']})" if run["job"]["message"] else ""),
        f"created     {when(run['created_at'])}",
        f"tags        {' '.join(run['tags']) or '-'}",
        f"base        {version(links['base_version'], 'model')}",
        f"dataset     {version(links['dataset_version'], 'dataset')}",
        f"made        {version(links['model_version'], 'model')}",
        f"steps       {run['steps']}",
    ]
    if run["last_metrics"]:
        last = run["last_metrics"]
        lines.append(f"last step   {last['step']}: {_values(last['metrics'])}")
    lines.append(f"final       {_values(run['final_metrics'])}")
    lines.append("params")
    lines += [f"  {name} = {_short(value)}" for name, value in _flat(run["params"]).items()]
    if run["environment"]:
        lines.append("environment")
        lines += [f"  {name} = {_short(value)}" for name, value in _flat(run["environment"]).items()]
    if run["artifacts"]:
        lines.append("artifacts")
        lines += [f"  {_short(a)}" for a in run["artifacts"]]
    return "\n".join(lines)


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


@runs.command("show")
@click.argument("run_id", metavar="RUN")
@client_options
@json_option()
def runs_show(run_id, url, key, home, as_json):
    """One run: its state, links, parameters, environment, artifacts, last and final metrics."""
    emit(make_client(url, key, home).get(f"/admin/runs/{run_id}"), as_json, _show)


def _by_run(rows: list[dict], first: str, ids: list[str], last: list[str]) -> str:
    """A table with a column per run, headed by the run's id as it is written (ids are case-sensitive)."""
    lines = table(rows, [first, *ids, *last]).splitlines()
    for run_id in ids:  # same length upper-cased, so the columns stay aligned
        lines[0] = lines[0].replace(run_id.upper(), run_id, 1)
    return "\n".join(lines)


@runs.command("compare")
@click.argument("run_ids", metavar="RUN RUN...", nargs=-1, required=True)
@click.option("--all", "show_all", is_flag=True, help="Show the parameters that are the same too.")
@client_options
@json_option("Print JSON, per-step metrics aligned by step included (`steps`, `series`).")
def runs_compare(run_ids, show_all, url, key, home, as_json):
    """Compare runs side by side: the parameters that differ (* marks them) and the final metrics."""
    if len(run_ids) < 2:
        raise click.BadParameter("name two runs or more", param_hint="RUN")
    data = make_client(url, key, home).get("/admin/runs/compare", ids=",".join(run_ids))

    def render(d: dict) -> str:
        ids = [r["id"] for r in d["runs"]]
        params = [{"param": p["param"], **dict(zip(ids, map(_short, p["values"]))), "differs": "*" if p["differs"] else ""}
                  for p in d["params"] if show_all or p["differs"]]
        metrics = [{"metric": m["metric"], **dict(zip(ids, map(_short, m["values"])))} for m in d["final_metrics"]]
        parts = [_by_run(params, "param", ids, ["differs"]) if params else "the runs' parameters are the same"]
        parts.append(_by_run(metrics, "metric", ids, []) if metrics else "no final metrics yet")
        parts.append(f"{len(d['steps'])} steps of {', '.join(d['series']) or 'no'} metrics: "
                     "--json has them aligned by step")
        return "\n\n".join(parts)

    emit(data, as_json, render)


@runs.command("tag")
@click.argument("run_id", metavar="RUN")
@click.option("--add", "add", multiple=True, metavar="TAG", help="A tag to add (repeat for more).")
@click.option("--remove", "remove", multiple=True, metavar="TAG", help="A tag to remove (repeat for more).")
@client_options
@json_option()
def runs_tag(run_id, add, remove, url, key, home, as_json):
    """Add and remove a run's tags (no spaces or commas in a tag)."""
    if not add and not remove:
        raise click.UsageError("give --add TAG or --remove TAG")
    run = make_client(url, key, home).request("PATCH", f"/admin/runs/{run_id}",
                                              json={"add_tags": list(add), "remove_tags": list(remove)})
    emit(run, as_json, lambda r: f"{r['id']}: tags {' '.join(r['tags']) or '(none)'}")


@runs.command("export")
@click.argument("run_ids", metavar="[RUN...]", nargs=-1)
@click.option("--experiment", help="Every run of this experiment, oldest first (instead of RUN...).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), required=True,
              help="csv: a row per run, its parameters and final metrics as columns; json: each run in full, "
                   "with its metrics per step.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write to this file (complete or not at all) instead of standard output.")
@client_options
def runs_export(run_ids, experiment, fmt, output, url, key, home):
    """Export runs, named or of an experiment, as CSV or JSON."""
    if bool(run_ids) == bool(experiment):
        raise click.UsageError("name runs, or give --experiment, not both")
    query = {"format": fmt, **({"experiment": experiment} if experiment else {"ids": ",".join(run_ids)})}
    write_output(make_client(url, key, home).download("/admin/runs/export", **query), output)
