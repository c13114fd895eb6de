"""Quality gates: a rule per registered model that a new version must pass before it is deployed.

A gate names an evaluation (a dataset version, the metric it is judged on, and how to ask:
columns, system prompt, judge, sample) and what passing means: the metric in points
(0..100) not below `min_score`, and not more than `max_drop` points below the version
that is deployed now. When a version of a gated model is registered (uploaded, imported
or made by a fine-tune), a `gate` job is queued: the worker evaluates the version, and the
deployed one if it has no evaluation of the same kind yet (services/worker/gates.py), and
records the verdict on the version (`model_versions.gate`). Deploying a version of a gated
model is refused until it has passed, with the reason; `force` deploys it anyway (audited).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated

import msgspec

from appliance.audit import Actor
from appliance.errors import ApplianceError, Conflict, InvalidRequest, NotFound
from appliance.evaluation import METRICS, Evaluate, Judge

if TYPE_CHECKING:
    import sqlite_utils

STATES = ("pending", "passed", "failed", "error")


class GateError(ApplianceError):
    status = 400


class Gate(msgspec.Struct, forbid_unknown_fields=True):
    dataset: str
    metric: str  # one of appliance.evaluation.METRICS
    max_drop: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None  # points below the deployed version
    min_score: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None  # points
    dataset_version: Annotated[int, msgspec.Meta(ge=1)] | None = None  # default: the latest when the gate is set
    split: str | None = None
    input_column: str | None = None
    reference_column: str | None = None
    system: Annotated[str, msgspec.Meta(max_length=20_000)] | None = None
    judge: Judge | None = None
    sample: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 0
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32_768)] = 256


class Check(msgspec.Struct, forbid_unknown_fields=True):
    """A `gate` job: evaluate version `version` of `model` against its gate."""

    model: str
    version: Annotated[int, msgspec.Meta(ge=1)]
    name: str | None = None  # "model:version", for the audit and job lists


def evaluation_of(gate: Gate, model: str, version: int | None, experiment: str) -> Evaluate:
    """The evaluation a gate asks for, of one version."""
    return Evaluate(model=model, model_version=version, dataset=gate.dataset, dataset_version=gate.dataset_version,
                    split=gate.split, input_column=gate.input_column, reference_column=gate.reference_column,
                    system=gate.system, judge=gate.judge, sample=gate.sample, seed=gate.seed,
                    max_tokens=gate.max_tokens, metrics=[gate.metric], experiment=experiment)


def set_gate(db: sqlite_utils.Database, model: str, gate: Gate, *, served: set[str], created_by: str | None) -> dict:
    """Set (or replace) `model`'s gate, checked as its evaluation would be; the dataset version pinned."""
    from appliance import evaluation, model_registry

    model_registry.versions(db, model)  # 404 for an unknown model
    if gate.metric not in METRICS:
        raise InvalidRequest(f"unknown metric {gate.metric!r}: choose from {', '.join(METRICS)}", param="metric")
    if gate.max_drop is None and gate.min_score is None:
        raise InvalidRequest("a gate needs max_drop (points below the deployed version), min_score, or both",
                             param="max_drop")
    try:  # as a served model of that name, so that any version's evaluation is checked alike
        checked = evaluation.resolve(db, evaluation_of(gate, model, None, experiment_of(model)), {model} | served)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param=(exc.param or "").removeprefix("params.") or None) from None
    gate = msgspec.structs.replace(gate, dataset_version=checked.dataset_version, input_column=checked.input_column,
                                   reference_column=checked.reference_column)
    now = time.time()
    db["model_gates"].upsert({"model": model, "rule": json.dumps(msgspec.to_builtins(gate)), "created_at": now,
                              "created_by": created_by, "updated_at": now}, pk="model")
    return get_gate(db, model)


def get_gate(db: sqlite_utils.Database, model: str) -> dict:
    row = db.execute("SELECT rule, created_at, created_by, updated_at FROM model_gates WHERE model = ?",
                     [model]).fetchone()
    if row is None:
        raise NotFound(f"model {model!r} has no quality gate", param="name")
    return {"model": model, **json.loads(row[0]), "created_at": row[1], "created_by": row[2], "updated_at": row[3]}


def rule(db: sqlite_utils.Database, model: str) -> Gate | None:
    row = db.execute("SELECT rule FROM model_gates WHERE model = ?", [model]).fetchone()
    return msgspec.json.decode(row[0], type=Gate) if row else None


def delete_gate(db: sqlite_utils.Database, model: str) -> dict:
    gate = get_gate(db, model)
    db.execute("DELETE FROM model_gates WHERE model = ?", [model])
    return gate


def experiment_of(model: str) -> str:
    return f"gate-{model}"


def deployed_version(db: sqlite_utils.Database, model: str) -> dict | None:
    """The version of `model` deployed most recently and still running, if any: {"version", "id"}."""
    row = db.execute("""SELECT v.version, v.id FROM deployments d JOIN model_versions v ON v.id = d.version_id
                        WHERE v.model = ? AND d.state = 'running' ORDER BY d.created_at DESC LIMIT 1""",
                     [model]).fetchone()
    return {"version": row[0], "id": row[1]} if row else None


def record(db: sqlite_utils.Database, version_id: str, state: str, reason: str, **detail) -> None:
    """The verdict on a version: its state, why, and what it was measured with (job ids, scores)."""
    db.execute("UPDATE model_versions SET gate = ? WHERE id = ?",
               [json.dumps({"state": state, "reason": reason, "at": time.time(), **detail}), version_id])


def verdict(gate: Gate, score: float, baseline: tuple[int, float] | None) -> tuple[str, str]:
    """passed or failed, and why: `score` and the deployed version's (its number, its score), 0..1."""
    points = score * 100
    name = gate.metric
    if gate.min_score is not None and points < gate.min_score:
        return "failed", f"{name} {points:.1f} is below the gate's minimum of {gate.min_score:g}"
    if gate.max_drop is not None and baseline is not None:
        number, base = baseline[0], baseline[1] * 100
        if points < base - gate.max_drop:
            return "failed", (f"{name} {points:.1f} is {base - points:.1f} points below deployed version {number}'s "
                              f"{base:.1f} (the gate allows {gate.max_drop:g})")
        return "passed", f"{name} {points:.1f} against deployed version {number}'s {base:.1f} (allowed drop {gate.max_drop:g})"
    if gate.min_score is not None:
        return "passed", f"{name} {points:.1f}, at least {gate.min_score:g}" + (
            "" if baseline is not None or gate.max_drop is None else "; no version deployed to compare with")
    return "passed", f"{name} {points:.1f}; no version deployed to compare with"


def schedule(db: sqlite_utils.Database, version: dict, *, required: bool = False) -> dict:
    """For a new version of a gated model (or one asked to be checked, `required`): a `gate`
    job, queued by the caller (jobs.db is its queue), and the version marked pending; the
    version as it is now."""
    from appliance import jobs, model_registry

    if rule(db, version["model"]) is None:
        if required:
            raise NotFound(f"model {version['model']!r} has no quality gate", param="name")
        return version
    check = Check(model=version["model"], version=version["version"], name=f"{version['model']}:{version['version']}")
    job = jobs.create(db, "gate", check, Actor(version["created_by"], "quality gate", None))
    record(db, version["id"], "pending", f"evaluation queued as job {job['id']}", job=job["id"])
    return model_registry.get_version(db, version["model"], version["version"])


def check_deployable(db: sqlite_utils.Database, version: dict, *, force: bool) -> None:
    """409 with the reason when `version`'s model has a gate it has not passed (unless `force`)."""
    if force or rule(db, version["model"]) is None:
        return
    gate = version.get("gate") or {"state": "pending", "reason": "not evaluated yet (set the gate before this "
                                                                 "version was registered? check it: "
                                                                 f"appliance models gate check {version['model']}:"
                                                                 f"{version['version']})"}
    if gate["state"] != "passed":
        raise Conflict(f"{version['model']} version {version['version']} has not passed its quality gate: "
                       f"{gate['state']}: {gate['reason']} (force deploys it anyway)", param="version")
