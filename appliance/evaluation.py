"""Evaluation jobs: a model answers a dataset's inputs and is scored against its references.

What is evaluated is a served model (a profile model or a deployment) or a registered
version, which the worker serves on a temporary llama.cpp engine for the job. Metrics are
the rule metrics of appliance/eval_metrics.py and `judge`: a served model scores each
answer with a rubric, on a scale; an answer the judge scored in no way it could be read is
counted (`judge_unparsed`) and shown, never guessed. A quick run scores `sample` rows only,
chosen by the seed.

`resolve` checks a job against the registries and what is served before it is queued
(4xx naming the parameter) and records it resolved. Every job is a run in an experiment
(appliance/experiments.py); its samples are rows of `eval_samples`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import msgspec

from appliance.errors import InvalidRequest, NotFound
from appliance.eval_metrics import RULE_METRICS

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    import sqlite_utils

METRICS = (*RULE_METRICS, "judge")
INPUT_COLUMNS = ("input", "prompt", "question", "instruction")
REFERENCE_COLUMNS = ("reference", "answer", "expected", "output", "response", "target")
SERVABLE_FORMATS = ("gguf", "gguf-lora")  # what the worker can serve on a temporary llama.cpp engine
SAMPLES_PAGE = 1000
MAX_COMPARED = 10  # evaluation runs compared at once
COMPARED_SAMPLES = 50  # changed samples shown by default
MAX_SAMPLES = 1_000_000  # of a run, read to compare

DEFAULT_RUBRIC = """You are grading an answer to a question against a reference answer.
Give a score from 1 (wrong or unrelated) to {scale} (correct and complete, as good as the reference).

Question: {input}
Reference answer: {reference}
Answer to grade: {answer}

Reply with JSON only: {{"score": <a whole number from 1 to {scale}>, "reason": "<one short sentence>"}}"""


class Judge(msgspec.Struct, forbid_unknown_fields=True):
    model: str  # a served model
    rubric: Annotated[str, msgspec.Meta(min_length=1, max_length=20_000)] = DEFAULT_RUBRIC
    scale: Annotated[int, msgspec.Meta(ge=2, le=100)] = 5
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=8192)] = 256
    # Ask for JSON {"score", "reason"} (response_format json_schema): llama.cpp's and vLLM's
    # grammars hold the judge to it. Off: the score is read from free text.
    structured: bool = True


class Prompt(msgspec.Struct, forbid_unknown_fields=True):
    """A prompt template version (appliance/prompts.py) that makes each sample's messages, its
    variables taken from the row's columns of the same names."""

    name: str
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None  # default: the latest, recorded


class Evaluate(msgspec.Struct, forbid_unknown_fields=True):
    """An `eval` job's parameters. `model` names a served model; with `model_version`, a
    registered model's version instead."""

    model: str
    dataset: str
    model_version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    dataset_version: Annotated[int, msgspec.Meta(ge=1)] | None = None  # default: the latest
    split: str | None = None  # evaluates the split's "test" part
    input_column: str | None = None  # default: the first of INPUT_COLUMNS the dataset has
    reference_column: str | None = None  # default: the first of REFERENCE_COLUMNS
    system: Annotated[str, msgspec.Meta(max_length=20_000)] | None = None  # a `system` column overrides it
    metrics: Annotated[list[str], msgspec.Meta(min_length=1, max_length=len(METRICS))] | None = None
    judge: Judge | None = None
    prompt: Prompt | None = None  # a prompt template instead of `system`
    sample: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None  # quick mode: this many rows
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 0
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32_768)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.0
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    experiment: str = "default"
    name: str | None = None  # filled in by `resolve`: "model" or "model:version", for the audit and lists


def resolve(db: sqlite_utils.Database, job: Evaluate, served: Collection[str]) -> Evaluate:
    """The job with its versions, columns and metrics filled in; 4xx naming the parameter for
    a model that is neither served nor a servable version, a dataset without the columns, an
    unknown metric, or a judge that is not served."""
    from appliance import dataset_registry, model_registry  # pyarrow: loaded by the gateway, not the CLI
    from appliance.finetune import version_for_job

    model_registry.check_name(job.experiment, "experiment")
    if job.model_version is None:
        if job.model not in served:
            raise InvalidRequest(f"model {job.model!r} is not served (served: {', '.join(sorted(served)) or 'none'}); "
                                 "to evaluate a registered version, give model_version", param="params.model")
        name = job.model
    else:
        try:
            version = model_registry.get_version(db, job.model, job.model_version)
        except NotFound as exc:
            raise InvalidRequest(exc.message, param="params.model_version") from None
        if version["format"] not in SERVABLE_FORMATS:
            raise InvalidRequest(f"model {job.model} version {job.model_version} is {version['format']}: the worker "
                                 "serves GGUF versions only; deploy it, then evaluate the deployment by name",
                                 param="params.model_version")
        name = f"{job.model}:{job.model_version}"
    metrics = job.metrics or [*RULE_METRICS, *(["judge"] if job.judge else [])]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InvalidRequest(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}", param="params.metrics")
    if "judge" in metrics and job.judge is None:
        raise InvalidRequest("metric 'judge' needs a judge: params.judge.model, a served model", param="params.judge")
    if job.judge is not None:
        if "judge" not in metrics:
            metrics = [*metrics, "judge"]
        if job.judge.model not in served:
            raise InvalidRequest(f"judge model {job.judge.model!r} is not served (served: "
                                 f"{', '.join(sorted(served)) or 'none'})", param="params.judge.model")
        _check_rubric(job.judge.rubric)
    data = version_for_job(db, dataset_registry, job.dataset, job.dataset_version, "dataset")
    if job.split is not None:
        split = next((s for s in data["splits"] if s["id"] == job.split), None)
        if split is None or "test" not in split["parts"]:
            why = "no such split" if split is None else f"its parts: {', '.join(split['parts'])}"
            raise InvalidRequest(f"dataset {job.dataset} version {data['version']} has no split {job.split!r} with a "
                                 f"'test' part ({why})", param="params.split")
    types = {column["name"]: column["type"] for column in data["schema"]}
    input_column = _column(types, job.input_column, INPUT_COLUMNS, "input_column", job.dataset, data["version"])
    reference_column = _column(types, job.reference_column, REFERENCE_COLUMNS, "reference_column", job.dataset,
                               data["version"], lists=True)
    prompt = _prompt(db, job.prompt, types) if job.prompt else None
    return msgspec.structs.replace(job, dataset_version=data["version"], input_column=input_column,
                                   reference_column=reference_column, metrics=list(dict.fromkeys(metrics)), name=name,
                                   prompt=prompt)


def _prompt(db: sqlite_utils.Database, prompt: Prompt, types: dict[str, str]) -> Prompt:
    """The template version (the latest when none is named), when the dataset's columns give
    every variable it needs."""
    from appliance import prompts

    try:
        template = prompts.get_template(db, prompt.name)
        version = prompts.get_version(db, prompt.name, prompt.version or template["versions"][-1]["version"])
    except (NotFound, IndexError):
        raise InvalidRequest(f"no prompt template {prompt.name!r}" + (f" version {prompt.version}" if prompt.version
                                                                       else " with a version"),
                             param="params.prompt") from None
    missing = [v["name"] for v in version["variables"]
               if v["required"] and v["default"] is None and v["name"] not in types]
    if missing:
        raise InvalidRequest(f"prompt template {prompt.name} version {version['version']} needs variables the dataset "
                             f"has no columns for: {', '.join(missing)}", param="params.prompt")
    return Prompt(prompt.name, version["version"])


def _check_rubric(rubric: str) -> None:
    try:
        rubric.format(input="", reference="", answer="", scale=5)
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidRequest(f"the rubric may use {{input}}, {{reference}}, {{answer}} and {{scale}} (write {{{{ and "
                             f"}}}} for braces): {type(exc).__name__}: {exc}", param="params.judge.rubric") from None


def _column(types: dict[str, str], asked: str | None, names: tuple[str, ...], param: str, dataset: str, version: int,
            lists: bool = False) -> str:
    """The column a job reads: the one asked for, else the first of `names`; a text column
    (or, for references, a list of texts)."""
    column = asked or next((n for n in names if n in types), None)
    if column is None or column not in types:
        wanted = repr(asked) if asked else f"one of {', '.join(names)}"
        raise InvalidRequest(f"dataset {dataset} version {version} has no column {wanted} (its columns: "
                             f"{', '.join(types) or 'none'})", param=f"params.{param}")
    kind = types[column]
    if not (kind in ("string", "large_string") or (lists and kind.startswith("list<") and "string" in kind)):
        raise InvalidRequest(f"dataset {dataset} version {version}: column {column!r} is {kind}, not text",
                             param=f"params.{param}")
    return column


def record_samples(db: sqlite_utils.Database, job_id: str, samples: list[dict]) -> None:
    """Store samples (dicts with the table's columns but job_id; `scores` a dict): a sample
    written again (a job run again) replaces what was there."""
    db["eval_samples"].upsert_all(
        [{**s, "job_id": job_id, "reference": json.dumps(s["reference"], ensure_ascii=False),
          "scores": json.dumps(s["scores"])} for s in samples], pk=("job_id", "idx"))


def samples(db: sqlite_utils.Database, job_id: str, *, after: int = -1, limit: int = SAMPLES_PAGE) -> list[dict]:
    """A job's samples after index `after`, in order."""
    rows = db.query("SELECT * FROM eval_samples WHERE job_id = ? AND idx > ? ORDER BY idx LIMIT ?",
                    [job_id, after, limit])
    return [{**{k: v for k, v in r.items() if k != "job_id"}, "reference": json.loads(r["reference"]),
             "scores": json.loads(r["scores"])} for r in rows]


def compare(db: sqlite_utils.Database, run_ids: Sequence[str], *, metric: str | None = None,
            limit: int = COMPARED_SAMPLES) -> dict:
    """Evaluation runs of one dataset version side by side: each run's aggregates, metric by
    metric, and the samples (rows all the runs answered) whose `metric` score differs, the
    largest difference first. The first run is the baseline: a sample `improved` or
    `regressed` as the last run scored it against the first."""
    from appliance.experiments import runs_by_ids

    runs = runs_by_ids(db, run_ids, most=MAX_COMPARED)
    if len(runs) < 2:
        raise InvalidRequest("name two or more evaluation runs to compare", param="ids")
    for run in runs:
        if db.execute("SELECT kind FROM jobs WHERE id = ?", [run["id"]]).fetchone()[0] != "eval":
            raise InvalidRequest(f"run {run['id']} is not an evaluation", param="ids")
    datasets = {(r["params"]["dataset"]["name"], r["params"]["dataset"]["version"], r["params"]["dataset"]["split"])
                for r in runs}
    if len(datasets) > 1:
        listed = "; ".join(f"{n} v{v}" + (f" split {s}" if s else "") for n, v, s in sorted(datasets, key=str))
        raise InvalidRequest(f"the runs evaluated different datasets ({listed}): compare runs of one", param="ids")
    shared = [m for m in runs[0]["params"]["metrics"] if all(m in r["params"]["metrics"] for r in runs)]
    metric = metric or next((m for m in ("judge", "rougeL", "token_f1", "exact_match") if m in shared), shared[0])
    if metric not in shared:
        raise InvalidRequest(f"not every run measured {metric!r} (all measured: {', '.join(shared)})", param="metric")
    by_run = {r["id"]: {s["row"]: s for s in samples(db, r["id"], limit=MAX_SAMPLES)} for r in runs}
    rows = sorted(set.intersection(*(set(s) for s in by_run.values())))
    changed, counts = [], {"improved": 0, "regressed": 0, "same": 0}
    for row in rows:
        scores = [by_run[r["id"]][row]["scores"].get(metric) for r in runs]
        first, last = scores[0], scores[-1]
        if first is not None and last is not None:
            counts["same" if abs(last - first) < 1e-9 else "improved" if last > first else "regressed"] += 1
        known = [s for s in scores if s is not None]
        if len(known) < 2 or max(known) - min(known) < 1e-9:
            continue
        any_sample = by_run[runs[0]["id"]][row]
        changed.append({"row": row, "input": any_sample["input"], "reference": any_sample["reference"],
                        "spread": max(known) - min(known),
                        "runs": [{"answer": by_run[r["id"]][row]["answer"], "score": s} for r, s in zip(runs, scores)]})
    changed.sort(key=lambda c: (-c["spread"], c["row"]))
    names = _ordered_metrics(runs)
    return {
        "runs": [{"id": r["id"], "model": r["params"]["model"], "prompt": r["params"].get("prompt"),
                  "state": r["state"]} for r in runs],
        "dataset": dict(zip(("name", "version", "split"), next(iter(datasets)))),
        "metrics": [{"metric": m, "values": [(r["final_metrics"] or {}).get(m) for r in runs]} for m in names],
        "metric": metric, "samples_compared": len(rows), **counts, "changed": changed[:limit],
        "changed_total": len(changed),
    }


def _ordered_metrics(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(m for r in runs for m in (r["final_metrics"] or {})))
