"""Experiment tracking: every fine-tuning or evaluation job is a run in an experiment.

A run (table `runs`, keyed by its job's id) records what the job was given (`params`,
resolved, as JSON), where it ran (`environment`), the versions it links (base model,
dataset, and the model version it made), its tags, what it made (`artifacts`) and its
final metrics; its metrics per training step are the job's rows in `job_metrics`. The
worker calls `start_run` when a job starts, `record_metrics` each step and `finish_run`
at the end; an experiment is made by its first run.

Runs are searched by experiment, tag and parameter (`list_runs`: dotted paths into the
params, compared as JSON values), compared side by side (`compare`) and exported as CSV
or JSON (`export`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from appliance.db import transaction
from appliance.errors import Conflict, InvalidRequest, NotFound
from appliance.model_registry import check_name

if TYPE_CHECKING:
    import sqlite_utils

FORMATS = ("csv", "json")
MAX_COMPARED = 10  # runs compared side by side at once
MAX_FILTERS = 16  # parameters searched at once
MAX_TAGS = 64  # on one run
TAG_PATTERN = re.compile(r"^[^\s,]{1,64}$")  # no spaces (CSV joins tags with one) or commas (lists of them)
PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # one part of a dotted parameter path; digits index a list
METRICS_PAGE = 10_000  # steps read at once by default


def start_run(db: sqlite_utils.Database, job_id: str, experiment: str, params: dict, *, created_by: str | None,
              base_version_id: str | None = None, dataset_version_id: str | None = None,
              environment: dict | None = None, tags: Iterable[str] = ()) -> dict:
    """Record job `job_id` as a run of `experiment` (made on its first run) with its parameters.

    A job that starts again (resumed from a checkpoint) calls this again: its params,
    environment and links are replaced, its tags kept and the new ones added; it cannot
    move to another experiment.
    """
    experiment = _experiment_name(experiment)
    if not isinstance(params, dict):
        raise InvalidRequest(f"params must be a JSON object, got {type(params).__name__}", param="params")
    if environment is not None and not isinstance(environment, dict):
        raise InvalidRequest(f"environment must be a JSON object, got {type(environment).__name__}", param="environment")
    new_tags = _check_tags(tags, "tags")
    with transaction(db):
        _require_job(db, job_id)
        _require_version(db, "model_versions", base_version_id, "base_version_id")
        _require_version(db, "dataset_versions", dataset_version_id, "dataset_version_id")
        now = time.time()
        if not db.execute("SELECT 1 FROM experiments WHERE name = ?", [experiment]).fetchone():
            db["experiments"].insert({"name": experiment, "description": None, "created_at": now,
                                      "created_by": created_by})
        existing = db.execute("SELECT experiment, tags FROM runs WHERE id = ?", [job_id]).fetchone()
        values = {"params": _dumps(params, "params"),
                  "environment": _dumps(environment, "environment") if environment is not None else None,
                  "base_version_id": base_version_id, "dataset_version_id": dataset_version_id}
        if existing is None:
            db["runs"].insert({"id": job_id, "experiment": experiment, "tags": json.dumps(new_tags),
                               "artifacts": "[]", "final_metrics": None, "model_version_id": None,
                               "created_at": now, **values})
        else:
            if existing[0] != experiment:
                raise Conflict(f"job {job_id} is already a run of experiment {existing[0]!r}, not {experiment!r}",
                               param="experiment")
            merged = _merge_tags(json.loads(existing[1]), new_tags, [])
            db.execute("UPDATE runs SET params = ?, environment = ?, base_version_id = ?, dataset_version_id = ?, "
                       "tags = ? WHERE id = ?", [*values.values(), json.dumps(merged), job_id])
    return get_run(db, job_id)


def record_metrics(db: sqlite_utils.Database, job_id: str, step: int, metrics: dict) -> None:
    """The job's metrics at training `step` (1, 2, ...): numbers by name. A step written again
    (a job resumed from a checkpoint before it) replaces what was there. A value that is not
    finite (a diverged loss) is kept as null."""
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 2**63 - 1:
        raise InvalidRequest(f"step must be a whole number from 1, got {step!r}", param="step")
    if not isinstance(metrics, dict):
        raise InvalidRequest(f"metrics must be an object of numbers by name, got {type(metrics).__name__}",
                             param="metrics")
    clean = _numbers(metrics, "metrics")
    _require_job(db, job_id)
    db.execute("INSERT OR REPLACE INTO job_metrics (job_id, step, at, metrics) VALUES (?, ?, ?, ?)",
               [job_id, step, time.time(), json.dumps(clean)])


def metrics(db: sqlite_utils.Database, job_id: str, *, after_step: int = 0, limit: int = METRICS_PAGE) -> list[dict]:
    """The job's metrics of the steps above `after_step`, in step order, at most `limit`:
    [{"step", "at", "metrics": {name: value}}] (404 for an unknown job)."""
    _require_job(db, job_id)
    rows = db.execute("SELECT step, at, metrics FROM job_metrics WHERE job_id = ? AND step > ? ORDER BY step LIMIT ?",
                      [job_id, after_step, limit]).fetchall()
    return [{"step": step, "at": at, "metrics": json.loads(values)} for step, at, values in rows]


def finish_run(db: sqlite_utils.Database, job_id: str, *, final_metrics: dict, artifacts: Sequence,
               model_version_id: str | None = None) -> dict:
    """What the run made: its final metrics, its artifacts (objects in the store, as the worker
    describes them) and the model version it registered, if any."""
    if not isinstance(final_metrics, dict):
        raise InvalidRequest("final_metrics must be an object of numbers by name", param="final_metrics")
    if isinstance(artifacts, (str, bytes, dict)) or not isinstance(artifacts, Sequence):
        raise InvalidRequest("artifacts must be a list", param="artifacts")
    clean = _numbers(final_metrics, "final_metrics")
    with transaction(db):
        check_run(db, job_id)
        _require_version(db, "model_versions", model_version_id, "model_version_id")
        db.execute("UPDATE runs SET final_metrics = ?, artifacts = ?, model_version_id = ? WHERE id = ?",
                   [json.dumps(clean), _dumps(list(artifacts), "artifacts"), model_version_id, job_id])
    return get_run(db, job_id)


def list_experiments(db: sqlite_utils.Database) -> list[dict]:
    """Experiments by name, each with how many runs it has and when the last began."""
    return list(db.query(
        """SELECT e.name, e.description, e.created_at, e.created_by, count(r.id) AS runs,
                  max(r.created_at) AS last_run_at
           FROM experiments e LEFT JOIN runs r ON r.experiment = e.name
           GROUP BY e.name ORDER BY e.name"""))


def list_runs(db: sqlite_utils.Database, experiment: str | None = None, tag: str | None = None,
              where: dict[str, str] | None = None, *, limit: int = 1000) -> list[dict]:
    """Runs, newest first: of `experiment`, with `tag`, and whose params match every entry of
    `where`: a dotted path into the params (`lora.rank`; a number indexes a list) and a value,
    read as JSON when it parses (`8`, `0.0002`, `true`, `null`, `["q_proj"]`, `"8"`) and
    as a string otherwise (`chat`). Errors name the filter as the API takes it: `param.<path>`."""
    clauses, args = [], []
    if experiment is not None:
        _require_experiment(db, experiment)
        clauses.append("r.experiment = ?")
        args.append(experiment)
    if tag is not None:
        clauses.append("EXISTS (SELECT 1 FROM json_each(r.tags) WHERE json_each.value = ?)")
        args.append(tag)
    for clause, clause_args in _param_filters(where or {}):
        clauses.append(clause)
        args += clause_args
    sql = (f"{_RUN_SELECT} {'WHERE ' + ' AND '.join(clauses) if clauses else ''} "
           "ORDER BY r.created_at DESC, r.id LIMIT ?")
    return [_public(row) for row in db.query(sql, [*args, limit])]


def check_run(db: sqlite_utils.Database, run_id: str) -> None:
    """404 naming `run_id` unless the run exists."""
    if db.execute("SELECT 1 FROM runs WHERE id = ?", [run_id]).fetchone() is None:
        raise NotFound(f"no run {run_id!r} (a run's id is its job's id)", param="run_id")


def get_run(db: sqlite_utils.Database, run_id: str) -> dict:
    """One run: as `list_runs` shows it, plus its job, its links (each version's model or dataset
    and number), how many steps it recorded and the last one's metrics."""
    rows = list(db.query(f"{_RUN_SELECT} WHERE r.id = ?", [run_id]))
    if not rows:
        raise NotFound(f"no run {run_id!r} (a run's id is its job's id)", param="run_id")
    row = rows[0]
    run = _public(row)
    job = db.execute("SELECT kind, message, started_at, finished_at, created_by_name FROM jobs WHERE id = ?",
                     [run_id]).fetchone()
    run["job"] = {"id": run_id, "kind": job[0], "state": run["state"], "message": job[1], "started_at": job[2],
                  "finished_at": job[3], "created_by": job[4]}
    run["links"] = {
        "job": run_id,
        "base_version": _model_version(db, row["base_version_id"]),
        "dataset_version": _dataset_version(db, row["dataset_version_id"]),
        "model_version": _model_version(db, row["model_version_id"]),
    }
    steps, last = db.execute("SELECT count(*), max(step) FROM job_metrics WHERE job_id = ?", [run_id]).fetchone()
    run["steps"] = steps
    run["last_metrics"] = None
    if last is not None:
        at, values = db.execute("SELECT at, metrics FROM job_metrics WHERE job_id = ? AND step = ?",
                                [run_id, last]).fetchone()
        run["last_metrics"] = {"step": last, "at": at, "metrics": json.loads(values)}
    return run


def tag_run(db: sqlite_utils.Database, run_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> dict:
    """Add and remove tags (adding one it has, or removing one it lacks, changes nothing)."""
    added, removed = _check_tags(add, "add_tags"), _check_tags(remove, "remove_tags")
    with transaction(db):
        check_run(db, run_id)
        current = json.loads(db.execute("SELECT tags FROM runs WHERE id = ?", [run_id]).fetchone()[0])
        tags = _merge_tags(current, added, removed)
        if len(tags) > MAX_TAGS:
            raise InvalidRequest(f"a run has at most {MAX_TAGS} tags", param="add_tags")
        db.execute("UPDATE runs SET tags = ? WHERE id = ?", [json.dumps(tags), run_id])
    return get_run(db, run_id)


def compare(db: sqlite_utils.Database, run_ids: Sequence[str]) -> dict:
    """Runs side by side: their params (flattened to dotted names) with `differs` where the
    values are not all the same (a param one run lacks differs), their final metrics, and their
    per-step metrics aligned by step for charts: `steps` (every step any run recorded) and
    `series[metric][run_id]`, one value (or null) per step."""
    runs = runs_by_ids(db, run_ids, most=MAX_COMPARED)
    ids = [r["id"] for r in runs]
    params = [_flatten(r["params"]) for r in runs]
    finals = [r["final_metrics"] or {} for r in runs]
    per_step: dict[str, dict[int, dict]] = {
        run_id: {s: json.loads(m) for s, m in db.execute(
            "SELECT step, metrics FROM job_metrics WHERE job_id = ? ORDER BY step", [run_id]).fetchall()}
        for run_id in ids}
    steps = sorted({s for by_step in per_step.values() for s in by_step})
    names = _ordered(name for by_step in per_step.values() for values in by_step.values() for name in values)
    return {
        "runs": [{k: r[k] for k in ("id", "experiment", "state", "tags", "created_at")} for r in runs],
        "params": _side_by_side(params, "param"),
        "final_metrics": _side_by_side(finals, "metric"),
        "steps": steps,
        "series": {name: {run_id: [per_step[run_id].get(s, {}).get(name) for s in steps] for run_id in ids}
                   for name in names},
    }


def export(db: sqlite_utils.Database, run_ids_or_experiment: str | Sequence[str], fmt: str) -> str:
    """The runs named, or every run of an experiment (oldest first), as a file's text.

    csv: one row per run: id, experiment, state, tags (separated by spaces), then each param
    as `param.<dotted name>` and each final metric as `metric.<name>`; lists and objects as
    JSON, null as empty. json: {"runs": [each run as `get_run` gives it, with "metrics", every
    step's]}."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}", param="format")
    if isinstance(run_ids_or_experiment, str):
        _require_experiment(db, run_ids_or_experiment)
        ids = [r[0] for r in db.execute("SELECT id FROM runs WHERE experiment = ? ORDER BY created_at, id",
                                        [run_ids_or_experiment]).fetchall()]
    else:
        ids = [r["id"] for r in runs_by_ids(db, run_ids_or_experiment, most=None)]
    runs = [get_run(db, run_id) for run_id in ids]
    if fmt == "json":
        for run in runs:
            run["metrics"] = metrics(db, run["id"], limit=-1)
        return json.dumps({"runs": runs}, indent=2, ensure_ascii=False) + "\n"
    flat = [_flatten(r["params"]) for r in runs]
    param_names = _ordered(name for f in flat for name in f)
    metric_names = _ordered(name for r in runs for name in (r["final_metrics"] or {}))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "experiment", "state", "tags", *(f"param.{n}" for n in param_names),
                     *(f"metric.{n}" for n in metric_names)])
    for run, f in zip(runs, flat):
        finals = run["final_metrics"] or {}
        writer.writerow([run["id"], run["experiment"], run["state"], " ".join(run["tags"]),
                         *(_cell(f.get(n)) for n in param_names), *(_cell(finals.get(n)) for n in metric_names)])
    return out.getvalue()


# --- helpers ---------------------------------------------------------------------------

_RUN_SELECT = """SELECT r.*, j.state AS state FROM runs r JOIN jobs j ON j.id = r.id"""
_MISSING = object()  # a param a run does not have, as opposed to one that is null


def _public(row: dict) -> dict:
    return {
        "id": row["id"], "experiment": row["experiment"], "state": row["state"],
        "params": json.loads(row["params"]), "tags": json.loads(row["tags"]),
        "environment": json.loads(row["environment"]) if row["environment"] else None,
        "final_metrics": json.loads(row["final_metrics"]) if row["final_metrics"] else None,
        "artifacts": json.loads(row["artifacts"]),
        "base_version_id": row["base_version_id"], "dataset_version_id": row["dataset_version_id"],
        "model_version_id": row["model_version_id"], "created_at": row["created_at"],
    }


def _experiment_name(name: str) -> str:
    if not isinstance(name, str):
        raise InvalidRequest("experiment must be a name", param="experiment")
    try:
        return check_name(name, "experiment")
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param="experiment") from None


def _require_experiment(db: sqlite_utils.Database, name: str) -> None:
    if db.execute("SELECT 1 FROM experiments WHERE name = ?", [name]).fetchone() is None:
        raise NotFound(f"no experiment {name!r}", param="experiment")


def _require_job(db: sqlite_utils.Database, job_id: str) -> None:
    if db.execute("SELECT 1 FROM jobs WHERE id = ?", [job_id]).fetchone() is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")


def _require_version(db: sqlite_utils.Database, table: str, version_id: str | None, param: str) -> None:
    if version_id is not None and db.execute(f"SELECT 1 FROM {table} WHERE id = ?", [version_id]).fetchone() is None:
        raise NotFound(f"no {table[:-1].replace('_', ' ')} {version_id!r}", param=param)


def _model_version(db: sqlite_utils.Database, version_id: str | None) -> dict | None:
    if version_id is None:
        return None
    row = db.execute("SELECT model, version FROM model_versions WHERE id = ?", [version_id]).fetchone()
    return {"id": version_id, "model": row[0], "version": row[1]} if row else {"id": version_id, "deleted": True}


def _dataset_version(db: sqlite_utils.Database, version_id: str | None) -> dict | None:
    if version_id is None:
        return None
    row = db.execute("SELECT dataset, version FROM dataset_versions WHERE id = ?", [version_id]).fetchone()
    return {"id": version_id, "dataset": row[0], "version": row[1]} if row else {"id": version_id, "deleted": True}


def runs_by_ids(db: sqlite_utils.Database, run_ids: Sequence[str], *, most: int | None) -> list[dict]:
    """The runs in the order named (each once); 400 for none or too many, 404 naming `ids` for an unknown one."""
    if isinstance(run_ids, str):
        raise InvalidRequest("ids must be a list of run ids", param="ids")
    ids = list(dict.fromkeys(run_ids))
    if not ids or any(not isinstance(i, str) or not i for i in ids):
        raise InvalidRequest("name at least one run id, with none empty", param="ids")
    if most is not None and len(ids) > most:
        raise InvalidRequest(f"at most {most} runs can be compared at once, got {len(ids)}", param="ids")
    runs = []
    for run_id in ids:
        rows = list(db.query(f"{_RUN_SELECT} WHERE r.id = ?", [run_id]))
        if not rows:
            raise NotFound(f"no run {run_id!r} (a run's id is its job's id)", param="ids")
        runs.append(_public(rows[0]))
    return runs


def _param_filters(where: dict[str, str]) -> list[tuple[str, list]]:
    """SQL conditions on the runs' params, one per (dotted path, value)."""
    if len(where) > MAX_FILTERS:
        raise InvalidRequest(f"at most {MAX_FILTERS} parameters can be searched at once", param="param")
    out = []
    for path, text in where.items():
        param = f"param.{path}"
        if not isinstance(text, str):
            raise InvalidRequest(f"{param}: the value must be text", param=param)
        segments = path.split(".")
        if not path or len(segments) > 16 or not all(PATH_SEGMENT.match(s) for s in segments):
            raise InvalidRequest(f"{param!r} is not a parameter path: names of letters, digits, '_' and '-' "
                                 "joined by '.', e.g. param.lora.rank", param=param)
        json_path = "$" + "".join(f"[{s}]" if s.isdigit() else f'."{s}"' for s in segments)
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        kind = "json_type(r.params, ?)"
        if value is None:
            out.append((f"{kind} = 'null'", [json_path]))
        elif isinstance(value, bool):
            out.append((f"{kind} = ?", [json_path, "true" if value else "false"]))
        elif isinstance(value, (int, float)):
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                value = float(value)  # SQLite's integers are 64-bit; its JSON reads a longer one as a real
            if not math.isfinite(value):
                raise InvalidRequest(f"{param}: {text!r} is not a finite number", param=param)
            out.append((f"{kind} IN ('integer', 'real') AND json_extract(r.params, ?) = ?", [json_path, json_path, value]))
        elif isinstance(value, str):
            out.append((f"{kind} = 'text' AND json_extract(r.params, ?) = ?", [json_path, json_path, value]))
        else:  # a list or an object: the same JSON, keys in the same order
            out.append((f"{kind} IN ('array', 'object') AND json_extract(r.params, ?) = json(?)",
                        [json_path, json_path, json.dumps(value, separators=(",", ":"))]))
    return out


def _check_tags(tags: Iterable[str], param: str) -> list[str]:
    if isinstance(tags, str) or tags is None:
        raise InvalidRequest(f"{param} must be a list of tags", param=param)
    checked = list(dict.fromkeys(tags))
    for tag in checked:
        if not isinstance(tag, str) or not TAG_PATTERN.match(tag):
            raise InvalidRequest(f"tag {tag!r} is not valid: 1 to 64 characters, no spaces or commas", param=param)
    if len(checked) > MAX_TAGS:
        raise InvalidRequest(f"a run has at most {MAX_TAGS} tags", param=param)
    return checked


def _merge_tags(current: list[str], add: list[str], remove: list[str]) -> list[str]:
    return [t for t in dict.fromkeys([*current, *add]) if t not in remove]


def _numbers(values: dict, param: str) -> dict:
    """Metrics by name, each a number or null; a value that is not finite becomes null."""
    clean = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{param}: a metric's name must be a non-empty string", param=param)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidRequest(f"{param}.{name} must be a number or null, got {value!r}", param=f"{param}.{name}")
        clean[name] = value if value is None or math.isfinite(value) else None
    return clean


def _dumps(value: Any, param: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{param} must be JSON (finite numbers, strings, lists, objects): {exc}",
                             param=param) from None


def _flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{"lora": {"rank": 8}} -> {"lora.rank": 8}; lists (and empty objects) are values."""
    flat: dict[str, Any] = {}
    for name, value in params.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _ordered(names: Iterable[str]) -> list[str]:
    """Each name once, in the order first seen."""
    return list(dict.fromkeys(names))


def _side_by_side(values: list[dict], label: str) -> list[dict]:
    rows = []
    for name in _ordered(n for v in values for n in v):
        found = [v.get(name, _MISSING) for v in values]
        differs = any(_canonical(x) != _canonical(found[0]) for x in found[1:])
        rows.append({label: name, "values": [None if x is _MISSING else x for x in found], "differs": differs})
    return rows


def _canonical(value: Any) -> Any:
    """What makes two JSON values the same: 8 and 8.0 are; a missing value is unlike null."""
    if value is _MISSING:
        return ("missing",)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, (int, float)):
        return ("number", value)
    return ("json", json.dumps(value, sort_keys=True))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
