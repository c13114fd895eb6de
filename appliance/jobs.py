"""Background jobs: what was asked, by whom, and how it went.

A job is a row in the state database's `jobs` table; the worker (services/worker) takes
it from Huey's queue in jobs.db and runs it. States: queued -> running -> succeeded or
failed; a queued job may be cancelled instead, and a running fine-tuning job asked to
stop (it stops at its next step, keeping its checkpoints). A job the worker was running
when it stopped is marked failed ("interrupted") when the worker starts again; a
fine-tuning job is queued again instead, and resumes from its last checkpoint.

Each job has a log (table `job_logs`): every change of state writes a line (queued,
started, succeeded with its result, failed with the reason, cancelled), and the work adds
lines of its own as it goes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from appliance import evaluation, finetune
from appliance.audit import Actor
from appliance.db import transaction
from appliance.errors import Conflict, InvalidRequest, NotFound, invalid_value
from appliance.objectstore.base import StoredObject

if TYPE_CHECKING:
    from collections.abc import Collection

    import sqlite_utils

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
MAX_LINE_CHARS = 4000  # a longer log line is cut to this
CHECKPOINTS = "checkpoints"  # the object store bucket of fine-tuning checkpoints
INTERRUPTED = "interrupted: the worker stopped while the job ran; submit it again"


class ModelImport(msgspec.Struct, forbid_unknown_fields=True):
    """Register a GGUF file or HF directory on the worker's machine as the next version of `name`."""

    name: str
    path: str
    sha256: str | None = None  # expected digest: a mismatch registers nothing


class DatasetImport(msgspec.Struct, forbid_unknown_fields=True):
    """Register a CSV, JSONL or Parquet file on the worker's machine as the next version of `name`."""

    name: str
    path: str
    format: Literal["csv", "jsonl", "parquet"] | None = None  # default: from the file name, else its content
    sha256: str | None = None


# What POST /admin/jobs takes. A `gate` job is queued by appliance/gates.py only (a new version of a
# gated model, or POST /admin/models/{name}/versions/{version}/gate), which marks the version pending.
KINDS: dict[str, type[msgspec.Struct]] = {"model.import": ModelImport, "dataset.import": DatasetImport,
                                          "finetune": finetune.FineTune, "eval": evaluation.Evaluate}
RESUMABLE = ("finetune",)  # kinds that checkpoint: stopped, they are queued again; running, they can be cancelled


def parse_params(kind: str, params: Any) -> msgspec.Struct:
    """The parameters of a job of `kind`, checked; the error names the kind and the field."""
    if kind not in KINDS:
        raise InvalidRequest(f"unknown job kind {kind!r}: choose one of {', '.join(KINDS)}", param="kind")
    try:
        checked = msgspec.convert(params, KINDS[kind])
    except msgspec.ValidationError as exc:
        raise invalid_value(exc, "params") from None
    if hasattr(checked, "path") and not os.path.isabs(checked.path):
        raise InvalidRequest(f"{kind} job: `path` must be absolute (a path on the worker's machine), got {checked.path!r}",
                             param="params.path")
    return checked


def prepare(db: sqlite_utils.Database, kind: str, params: msgspec.Struct, served: Collection[str] = ()) -> msgspec.Struct:
    """What the job will run with: a fine-tuning job (on an install that can train) or an
    evaluation resolved against the registries and the `served` models (4xx before anything
    is queued; appliance/finetune.py, appliance/evaluation.py)."""
    if kind == "finetune":
        finetune.require_training_stack()
        return finetune.resolve(db, params)
    if kind == "eval":
        return evaluation.resolve(db, params, served)
    return params


def create(db: sqlite_utils.Database, kind: str, params: msgspec.Struct, actor: Actor) -> dict:
    """A new queued job with parameters from `parse_params` (the caller enqueues its id for the worker)."""
    row = {
        "id": "job_" + uuid.uuid4().hex[:12], "kind": kind, "params": json.dumps(msgspec.to_builtins(params)),
        "state": "queued", "message": None, "result": None, "created_at": time.time(),
        "created_by": actor.key_id, "created_by_name": actor.key_name, "created_by_role": actor.role,
        "started_at": None, "finished_at": None,
    }
    with transaction(db):
        db["jobs"].insert(row)
        log(db, row["id"], f"queued by {actor.key_name}")
    return _public(row)


def get(db: sqlite_utils.Database, job_id: str) -> dict:
    rows = list(db.query("SELECT * FROM jobs WHERE id = ?", [job_id]))
    if not rows:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return _public(rows[0])


def list_jobs(db: sqlite_utils.Database, *, state: str | None = None, limit: int = 100) -> list[dict]:
    if state is not None and state not in STATES:
        raise InvalidRequest(f"unknown job state {state!r}: choose one of {', '.join(STATES)}", param="state")
    where, params = ("WHERE state = ?", [state]) if state else ("", [])
    return [_public(r) for r in db.query(f"SELECT * FROM jobs {where} ORDER BY created_at DESC LIMIT ?", [*params, limit])]


def cancel(db: sqlite_utils.Database, job_id: str, actor: Actor) -> dict:
    """Cancel a queued job (the worker skips it), or ask a running fine-tuning job to stop (it
    does at its next step). A finished job, or a running one that cannot stop, is refused."""
    with transaction(db):
        job = get(db, job_id)
        if job["state"] == "running" and job["kind"] in RESUMABLE:
            if job["cancel_requested_at"] is None:
                db.execute("UPDATE jobs SET cancel_requested_at = ? WHERE id = ?", [time.time(), job_id])
                log(db, job_id, f"cancel asked by {actor.key_name}: stopping at the next step")
            return get(db, job_id)
        if job["state"] != "queued":
            raise Conflict(f"job {job_id} is {job['state']}: only a queued job or a running fine-tuning job can be "
                           "cancelled", param="job_id")
        db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, message = 'cancelled before it ran' "
                   "WHERE id = ?", [time.time(), job_id])
        log(db, job_id, f"cancelled by {actor.key_name}")
    return get(db, job_id)


def wait(db: sqlite_utils.Database, job_id: str, why: str) -> None:
    """running -> queued: the job cannot start yet (`why`); the worker tries it again later."""
    with transaction(db):
        db.execute("UPDATE jobs SET state = 'queued', message = ? WHERE id = ?", [why, job_id])
        log(db, job_id, why)


def cancel_requested(db: sqlite_utils.Database, job_id: str) -> bool:
    row = db.execute("SELECT cancel_requested_at FROM jobs WHERE id = ?", [job_id]).fetchone()
    return row is not None and row[0] is not None


def stopped(db: sqlite_utils.Database, job_id: str, message: str, result: dict | None = None) -> None:
    """running -> cancelled: the work stopped when asked."""
    with transaction(db):
        db.execute("UPDATE jobs SET state = 'cancelled', result = ?, message = ?, finished_at = ? WHERE id = ?",
                   [json.dumps(result) if result is not None else None, message, time.time(), job_id])
        log(db, job_id, f"cancelled: {message}")


def claim(db: sqlite_utils.Database, job_id: str) -> dict | None:
    """queued -> running, for the worker; None when the job is gone or no longer queued (cancelled)."""
    with transaction(db):
        claimed = db.execute("UPDATE jobs SET state = 'running', started_at = ? WHERE id = ? AND state = 'queued'",
                             [time.time(), job_id]).rowcount
        job = get(db, job_id) if claimed else None
        if job is not None:
            log(db, job_id, f"started {job['kind']}: {_listing(job['params'])}")
    return job


def finish(db: sqlite_utils.Database, job_id: str, *, result: dict | None = None, error: str | None = None) -> None:
    with transaction(db):
        db.execute("UPDATE jobs SET state = ?, result = ?, message = ?, finished_at = ? WHERE id = ?",
                   ["failed" if error else "succeeded", json.dumps(result) if result is not None else None, error,
                    time.time(), job_id])
        log(db, job_id, f"failed: {error}" if error else f"succeeded: {_listing(result or {})}")


def interrupt_running(db: sqlite_utils.Database) -> tuple[list[str], list[str]]:
    """What a stopped worker left running: jobs that checkpoint are queued again (to resume),
    or cancelled when that was asked; the others fail. Returns (failed, queued again) ids."""
    failed, again = [], []
    with transaction(db):
        for job_id, kind, cancel_asked in db.execute(
                "SELECT id, kind, cancel_requested_at FROM jobs WHERE state = 'running'").fetchall():
            if kind in RESUMABLE and cancel_asked is not None:
                db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, message = ? WHERE id = ?",
                           [time.time(), "cancelled: the worker stopped before the job did", job_id])
                log(db, job_id, "cancelled: the worker stopped before the job did; its checkpoints are kept")
            elif kind in RESUMABLE:
                db.execute("UPDATE jobs SET state = 'queued' WHERE id = ?", [job_id])
                log(db, job_id, "the worker stopped while the job ran: queued again, to resume from its last checkpoint")
                again.append(job_id)
            else:
                db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, message = ? WHERE id = ?",
                           [time.time(), INTERRUPTED, job_id])
                log(db, job_id, f"failed: {INTERRUPTED}")
                failed.append(job_id)
    return failed, again


def add_checkpoint(db: sqlite_utils.Database, job_id: str, step: int, obj: StoredObject) -> None:
    """A job's checkpoint at `step`: an archive stored in the CHECKPOINTS bucket."""
    db.execute("INSERT OR REPLACE INTO job_checkpoints (job_id, step, at, key, sha256, size) VALUES (?, ?, ?, ?, ?, ?)",
               [job_id, step, time.time(), obj.key, obj.sha256, obj.size])


def last_checkpoint(db: sqlite_utils.Database, job_id: str) -> StoredObject | None:
    row = db.execute("SELECT key, sha256, size FROM job_checkpoints WHERE job_id = ? ORDER BY step DESC LIMIT 1",
                     [job_id]).fetchone()
    return None if row is None else StoredObject(CHECKPOINTS, *row)


def log(db: sqlite_utils.Database, job_id: str, text: str) -> None:
    """Append a line to the job's log, cut to MAX_LINE_CHARS; numbered one above the job's last."""
    if len(text) > MAX_LINE_CHARS:
        text = text[: MAX_LINE_CHARS - 1] + "…"
    db.execute("INSERT INTO job_logs (job_id, seq, at, text) "
               "SELECT ?, coalesce(max(seq), 0) + 1, ?, ? FROM job_logs WHERE job_id = ?",
               [job_id, time.time(), text, job_id])


def log_lines(db: sqlite_utils.Database, job_id: str, *, after: int = 0, limit: int = 1000) -> list[dict]:
    """The job's log lines numbered above `after`, oldest first, at most `limit` (404 for an unknown job)."""
    if db.execute("SELECT 1 FROM jobs WHERE id = ?", [job_id]).fetchone() is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    rows = db.execute("SELECT seq, at, text FROM job_logs WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                      [job_id, after, limit]).fetchall()
    return [{"seq": seq, "at": at, "text": text} for seq, at, text in rows]


def actor_of(job: dict) -> Actor:
    """Who asked for the job, as the audit log names them; the job id stands in for a request id."""
    by = job["created_by"]
    return Actor(by["key_id"], by["key_name"], by["role"], job["id"])


LISTED_CHARS = 200  # a longer value (a rubric, say) is cut to this in a log line


def _listing(values: dict, prefix: str = "") -> str:
    """name=x, lora.rank=8, lora.target_modules=q_proj,v_proj: the values that are set, for a log line."""
    parts = []
    for name, value in values.items():
        if isinstance(value, dict):
            parts.append(_listing(value, f"{prefix}{name}."))
        elif value is not None:
            text = " ".join((",".join(map(str, value)) if isinstance(value, list) else str(value)).split())
            parts.append(f"{prefix}{name}={text if len(text) <= LISTED_CHARS else text[:LISTED_CHARS - 1] + '…'}")
    return ", ".join(p for p in parts if p)


def _public(row: dict) -> dict:
    return {
        "id": row["id"], "kind": row["kind"], "state": row["state"], "params": json.loads(row["params"]),
        "message": row["message"], "result": json.loads(row["result"]) if row["result"] else None,
        "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
        "cancel_requested_at": row.get("cancel_requested_at"),
        "created_by": {"key_id": row["created_by"], "key_name": row["created_by_name"], "role": row["created_by_role"]},
    }
