"""`appliance models gate set|show|clear|check`: a model's quality gate (appliance/gates.py)."""

from __future__ import annotations

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit
from appliance.cli_options import client_options, json_option, name_and_version
from appliance.registry_cli import parse_name_version


@click.group("gate")
def models_gate() -> None:
    """A model's quality gate: the evaluation a new version must pass before it is deployed.
    A new version of a gated model is evaluated when it is registered or fine-tuned."""


def _text(gate: dict) -> str:
    rules = [f"{gate['metric']} at least {gate['min_score']:g}" if gate["min_score"] is not None else None,
             f"at most {gate['max_drop']:g} points below the deployed version" if gate["max_drop"] is not None
             else None]
    return (f"{gate['model']}: {' and '.join(r for r in rules if r)} ({gate['metric']} in points, 0-100), "
            f"on {gate['dataset']} v{gate['dataset_version']}" + (f" split {gate['split']}" if gate["split"] else "")
            + (f", {gate['sample']} rows" if gate["sample"] else "")
            + (f", judged by {gate['judge']['model']}" if gate["judge"] else ""))


@models_gate.command("set")
@click.argument("name")
@click.option("--dataset", required=True, metavar="NAME[:VERSION]", help="The evaluation dataset (default: latest).")
@click.option("--metric", required=True, help="exact_match, token_f1, bleu, rouge1, rouge2, rougeL or judge.")
@click.option("--max-drop", type=click.FloatRange(0, 100), metavar="POINTS",
              help="A new version may score at most this many points (of 100) below the deployed version.")
@click.option("--min-score", type=click.FloatRange(0, 100), metavar="POINTS", help="And at least this, of 100.")
@click.option("--split", metavar="SPLIT_ID", help="Evaluate this split's 'test' part.")
@click.option("--input-column")
@click.option("--reference-column")
@click.option("--system", help="A system prompt for every sample.")
@click.option("--judge", "judge_model", metavar="MODEL", help="A served model, for the judge metric.")
@click.option("--sample", type=click.IntRange(1), help="Evaluate this many rows (chosen by the seed, 0).")
@click.option("--max-tokens", type=click.IntRange(1, 32_768), default=256, show_default=True)
@client_options
@json_option()
def gate_set(name, dataset, metric, max_drop, min_score, split, input_column, reference_column, system, judge_model,
             sample, max_tokens, url, key, home, as_json):
    """Set (or replace) the gate of model NAME."""
    dataset_name, dataset_version = name_and_version(dataset, "--dataset")
    body = {"dataset": dataset_name, "dataset_version": dataset_version, "metric": metric, "max_drop": max_drop,
            "min_score": min_score, "split": split, "input_column": input_column,
            "reference_column": reference_column, "system": system, "sample": sample, "max_tokens": max_tokens,
            "judge": {"model": judge_model} if judge_model else None}
    gate = make_client(url, key, home).request("PUT", f"/admin/models/{name}/gate",
                                                json={k: v for k, v in body.items() if v is not None})
    emit(gate, as_json, lambda g: "gate set: " + _text(g))


@models_gate.command("show")
@click.argument("name")
@client_options
@json_option()
def gate_show(name, url, key, home, as_json):
    """The gate of model NAME."""
    emit(make_client(url, key, home).get(f"/admin/models/{name}/gate"), as_json, _text)


@models_gate.command("clear")
@click.argument("name")
@client_options
def gate_clear(name, url, key, home):
    """Remove the gate of model NAME: its versions deploy without one."""
    make_client(url, key, home).request("DELETE", f"/admin/models/{name}/gate")
    click.echo(f"{name} has no quality gate now")


@models_gate.command("check")
@click.argument("name_version", metavar="NAME:VERSION")
@client_options
@json_option()
def gate_check(name_version, url, key, home, as_json):
    """Evaluate a version against the gate now (one registered before the gate was set, or again)."""
    name, version = parse_name_version(name_version)
    row = make_client(url, key, home).post(f"/admin/models/{name}/versions/{version}/gate")
    emit(row, as_json, lambda r: f"{name} version {version}: {r['gate']['reason']}; follow it with "
                                 f"`appliance jobs logs -f {r['gate']['job']}`")
