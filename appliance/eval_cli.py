"""`appliance eval run|show`: evaluation jobs through the admin API, run by the worker."""

from __future__ import annotations

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, table
from appliance.cli_options import client_options, json_option, name_and_version
from appliance.jobs_cli import submit, wait_for

METRICS = ("exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL", "judge")  # appliance/evaluation.py
SHOWN_CHARS = 48  # of an input or answer in the samples table
SHOWN_SAMPLES = 20


@click.group("eval")
def eval_group() -> None:
    """Evaluate a served model or a registered version on a dataset: exact match, token F1,
    BLEU, ROUGE and a judge model. Each evaluation is a run (`appliance runs`)."""


@eval_group.command("run")
@click.argument("model", metavar="MODEL[:VERSION]")
@click.option("--dataset", required=True, metavar="NAME[:VERSION]",
              help="The registered dataset: an input column and a reference column.")
@click.option("--split", metavar="SPLIT_ID", help="Evaluate this split's 'test' part (appliance datasets split).")
@click.option("--input-column", help="Default: input, prompt, question or instruction, the first there is.")
@click.option("--reference-column", help="Default: reference, answer, expected, output, response or target.")
@click.option("--system", help="A system prompt for every sample (a 'system' column overrides it).")
@click.option("--prompt", metavar="TEMPLATE[:VERSION]",
              help="A prompt template makes each sample's messages, its variables from the row's columns "
                   "(default version: the latest).")
@click.option("--metrics", help=f"Comma-separated, from {', '.join(METRICS)}. Default: all but judge, and judge "
                                "with --judge.")
@click.option("--judge", "judge_model", metavar="MODEL", help="A served model that scores each answer with the rubric.")
@click.option("--rubric", type=click.File(), help="The judge's prompt, from a file: it may use {input}, {reference}, "
                                                  "{answer} and {scale}. Default: a grading prompt asking for JSON.")
@click.option("--scale", type=click.IntRange(2, 100), default=5, show_default=True, help="The judge scores 1..SCALE.")
@click.option("--sample", type=click.IntRange(1), help="Quick mode: evaluate this many rows, chosen by --seed.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 32_768), default=256, show_default=True,
              help="Of each answer.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Questions asked at once.")
@click.option("--experiment", default="default", show_default=True, help="The experiment this run belongs to.")
@click.option("--wait/--no-wait", default=False, show_default=True, help="Wait for the scores, then print them.")
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds to wait, with --wait.")
@client_options
@json_option()
def eval_run(model, dataset, split, input_column, reference_column, system, prompt, metrics, judge_model, rubric,
             scale, sample, seed, max_tokens, concurrency, experiment, wait, timeout, url, key, home, as_json):
    """Queue an evaluation of MODEL (a served model) or MODEL:VERSION (a registered version,
    served on a temporary engine for the job). Checked before it is queued."""
    model_name, model_version = name_and_version(model, "MODEL")
    dataset_name, dataset_version = name_and_version(dataset, "--dataset")
    template = None
    if prompt:
        template_name, template_version = name_and_version(prompt, "--prompt")
        template = {"name": template_name, "version": template_version}
    judge = None
    if judge_model:
        judge = {"model": judge_model, "scale": scale, **({"rubric": rubric.read()} if rubric else {})}
    elif rubric:
        raise click.BadParameter("a rubric is for a judge: add --judge MODEL", param_hint="--rubric")
    params = {
        "model": model_name, "model_version": model_version, "dataset": dataset_name,
        "dataset_version": dataset_version, "split": split, "input_column": input_column,
        "reference_column": reference_column, "system": system, "prompt": template, "judge": judge,
        "sample": sample, "seed": seed,
        "max_tokens": max_tokens, "concurrency": concurrency, "experiment": experiment,
        "metrics": [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None,
    }
    client = make_client(url, key, home)
    params = {k: v for k, v in params.items() if v is not None}
    if not wait:
        submit(client, "eval", params, as_json)
        return
    job = wait_for(client, client.post("/admin/jobs", {"kind": "eval", "params": params})["id"], timeout)
    if job["state"] != "succeeded":
        raise click.ClickException(f"evaluation {job['id']} {job['state']}: {job['message']}")
    _show(client, job["id"], SHOWN_SAMPLES, as_json)


@eval_group.command("show")
@click.argument("run_id")
@click.option("--samples", type=click.IntRange(0), default=SHOWN_SAMPLES, show_default=True, help="Samples listed (0: none).")
@client_options
@json_option("Print the run and all its samples as JSON.")
def eval_show(run_id, samples, url, key, home, as_json):
    """An evaluation's scores, and its samples: input, answer, scores and what the judge said."""
    _show(make_client(url, key, home), run_id, samples, as_json)


def _show(client, run_id: str, listed: int, as_json: bool) -> None:
    run = client.get(f"/admin/runs/{run_id}")
    rows, after = [], -1
    while as_json or len(rows) < listed:
        page = client.get(f"/admin/runs/{run_id}/samples", after=after)
        rows += page["samples"]
        if not page["samples"]:
            break
        after = page["next"]
    emit({"run": run, "samples": rows}, as_json, lambda _: _text(run, rows[:listed]))


def _cut(text) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def _text(run: dict, rows: list[dict]) -> str:
    params = run["params"]
    what = params["model"]["name"] + (f":{params['model']['version']}" if params["model"]["version"] else "")
    data = params["dataset"]
    lines = [f"{run['id']}  {what} on {data['name']} v{data['version']}  {run['state']}"]
    lines += [f"  {name:<15} {value:.4g}" if isinstance(value, float) else f"  {name:<15} {value}"
              for name, value in (run["final_metrics"] or {}).items()]
    if rows:
        lines.append("")
        lines.append(table([{"#": r["idx"], "input": _cut(r["input"]), "answer": _cut(r["error"] or r["answer"]),
                             **{m: f"{v:.2f}" for m, v in r["scores"].items() if m in ("token_f1", "rougeL", "judge")},
                             "judge said": _cut(r["judge_output"]) if r["judge_output"] else "-"} for r in rows],
                           ["#", "input", "answer", "token_f1", "rougeL", "judge", "judge said"]))
    return "\n".join(lines)


@eval_group.command("compare")
@click.argument("run_ids", nargs=-1, required=True)
@click.option("--metric", help="The score samples are compared on. Default: judge, rougeL, token_f1 or exact_match, "
                               "the first every run measured.")
@click.option("--limit", type=click.IntRange(0, 10_000), default=20, show_default=True,
              help="Changed samples listed.")
@client_options
@json_option()
def eval_compare(run_ids, metric, limit, url, key, home, as_json):
    """Evaluations of one dataset side by side, the first the baseline: each metric, then the
    samples whose score changed, most first, with each run's answer."""
    report = make_client(url, key, home).get("/admin/evaluations/compare", ids=",".join(run_ids), metric=metric,
                                             limit=limit)
    emit(report, as_json, _comparison)


def _label(run: dict) -> str:
    model, prompt = run["model"], run.get("prompt")
    return (model["name"] + (f":{model['version']}" if model.get("version") else "")
            + (f" prompt {prompt['name']}:{prompt['version']}" if prompt else ""))


def _comparison(report: dict) -> str:
    runs = report["runs"]
    heads = [f"{r['id']} ({_label(r)})" for r in runs]
    rows = [{"metric": m["metric"], **{h: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                                       for h, v in zip(heads, m["values"])}} for m in report["metrics"]]
    data = report["dataset"]
    lines = [f"on {data['name']} v{data['version']}" + (f" (split {data['split']})" if data["split"] else ""),
             table(rows, ["metric", *heads], ["METRIC", *heads]), "",
             f"{report['metric']} on {report['samples_compared']} samples, {runs[-1]['id']} against {runs[0]['id']}: "
             f"{report['improved']} improved, {report['regressed']} regressed, {report['same']} the same"]
    if report["changed"]:
        lines.append("")
        lines.append(table([{"row": c["row"], "input": _cut(c["input"]),
                             **{h: f"{run['score']:.2f} {_cut(run['answer'])}" if run["score"] is not None else "-"
                                for h, run in zip(heads, c["runs"])}} for c in report["changed"]],
                           ["row", "input", *heads], ["ROW", "INPUT", *heads]))
        if report["changed_total"] > len(report["changed"]):
            lines.append(f"… {report['changed_total'] - len(report['changed'])} more changed (--limit)")
    return "\n".join(lines)
