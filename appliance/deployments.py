"""Deployments: a registered model version served under a name, added and removed while
the appliance runs.

The database is the hand-off point. /admin writes the wanted state (`pending`, or
`stopping` to undeploy); the supervisor's deployment controller fetches the files,
starts the engine replicas and marks the deployment `running` with their endpoints;
the gateway routes to every `running` deployment and drops the rest, within a second,
with no restart. States: pending -> starting -> running; failed; stopping -> (row gone).
"""

from __future__ import annotations

import json
import time

import sqlite_utils

from appliance.db import transaction
from appliance.errors import Conflict, InvalidRequest, NotFound
from appliance import gates
from appliance.model_registry import check_name, get_version

STATES = ("pending", "starting", "running", "failed", "stopping")
ENGINES_BY_FORMAT = {"gguf": "llamacpp", "gguf-lora": "llamacpp", "hf": "vllm"}  # a LoRA runs on its GGUF base


def deploy(db: sqlite_utils.Database, model: str, version: int, *, name: str | None, replicas: int,
           context_length: int | None, reserved: set[str], created_by: str | None, force: bool = False) -> dict:
    """Ask for `model` version `version` to be served as `name` (default: the model's name);
    409 for a version that has not passed its model's quality gate, unless `force`."""
    served = check_name(name or model, "deployment")
    if served in reserved:
        raise Conflict(f"{served!r} is already served by the profile; deploy under another name", param="name")
    if not 1 <= replicas <= 16:
        raise InvalidRequest("replicas must be between 1 and 16", param="replicas")
    with transaction(db):
        row = get_version(db, model, version)
        gates.check_deployable(db, row, force=force)
        card_context = row["card"].get("context_length") or 2048
        context = context_length or min(card_context, 4096)
        if context < 128:
            raise InvalidRequest("context_length must be at least 128", param="context_length")
        if db.execute("SELECT 1 FROM deployments WHERE name = ?", [served]).fetchone():
            raise Conflict(f"a deployment named {served!r} exists already; undeploy it first", param="name")
        now = time.time()
        deployment = {
            "name": served, "version_id": row["id"], "engine": ENGINES_BY_FORMAT[row["format"]], "replicas": replicas,
            "context_length": context, "state": "pending", "endpoints": "[]", "message": None,
            "created_at": now, "created_by": created_by, "updated_at": now,
        }
        db["deployments"].insert(deployment)
    return get(db, served)


def undeploy(db: sqlite_utils.Database, name: str) -> dict:
    with transaction(db):
        get(db, name)
        db.execute("UPDATE deployments SET state = 'stopping', updated_at = ? WHERE name = ?", [time.time(), name])
    return get(db, name)


_SELECT = """SELECT d.*, v.model, v.version, v.format, v.sha256 FROM deployments d
             JOIN model_versions v ON v.id = d.version_id"""


def _public(row: dict) -> dict:
    out = dict(row)
    out["endpoints"] = [{k: e[k] for k in ("base_url",)} for e in json.loads(row["endpoints"])]  # keys stay inside
    return out


def get(db: sqlite_utils.Database, name: str) -> dict:
    rows = list(db.query(_SELECT + " WHERE d.name = ?", [name]))
    if not rows:
        raise NotFound(f"no deployment named {name!r}", param="name")
    return _public(rows[0])


def list_all(db: sqlite_utils.Database) -> list[dict]:
    return [_public(r) for r in db.query(_SELECT + " ORDER BY d.name")]


def wanted(db: sqlite_utils.Database) -> list[dict]:
    """Every deployment with its full endpoints (engine keys included), for the controller."""
    return [{**r, "endpoints": json.loads(r["endpoints"])} for r in db.query(_SELECT + " ORDER BY d.name")]


def running(db: sqlite_utils.Database) -> list[dict]:
    """What the gateway serves: running deployments, and failed ones whose engines had run
    (requests get a 503 that says why)."""
    return [r for r in wanted(db) if r["state"] == "running" or (r["state"] == "failed" and r["endpoints"])]


def set_state(db: sqlite_utils.Database, name: str, state: str, *, endpoints: list[dict] | None = None,
              message: str | None = None) -> None:
    """The controller's progress report; an undeploy asked for meanwhile (stopping) wins."""
    assert state in STATES
    fields, params = ["state = ?", "message = ?", "updated_at = ?"], [state, message, time.time()]
    if endpoints is not None:
        fields.append("endpoints = ?")
        params.append(json.dumps(endpoints))
    db.execute(f"UPDATE deployments SET {', '.join(fields)} WHERE name = ? AND state != 'stopping'", [*params, name])


def remove(db: sqlite_utils.Database, name: str) -> None:
    db.execute("DELETE FROM deployments WHERE name = ?", [name])
