"""Running one job: claim it, do its work, record the outcome and audit it.

Claiming and finishing write the job's first and last log lines (appliance/jobs.py); the
work writes what it does in between."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.trace import StatusCode

from appliance import audit, dataset_registry, jobs, model_registry
from appliance.db import open_db
from appliance.errors import ApplianceError, StorageUnavailable
from appliance.finetune import require_training_stack
from appliance.home import state_db_path
from appliance.objectstore import ObjectStore, ObjectStoreSettings
from services.gateway.runtime import ServedModel

log = logging.getLogger("appliance.worker")


@dataclass
class Work:
    """What a job's work is given: the state database, the object store, the job and its home."""

    db: object
    store: ObjectStore
    job: dict
    home: Path
    served: Sequence[ServedModel] = ()  # the profile's models, where they answer (evaluation jobs call them)
    enqueue: Callable[[str], None] | None = None  # queues a job the work made (a quality gate's evaluation)

    @property
    def params(self) -> dict:
        return self.job["params"]

    @property
    def actor(self) -> audit.Actor:
        return jobs.actor_of(self.job)

    def note(self, text: str) -> None:
        """A line in the job's log."""
        jobs.log(self.db, self.job["id"], text)

    def registered(self, version: dict) -> None:
        """A model version the work registered: its quality gate's evaluation, if it has one, is queued."""
        if version["gate"] is not None and self.enqueue is not None:
            self.enqueue(version["gate"]["job"])
            self.note(f"{version['model']} version {version['version']} has a quality gate: {version['gate']['reason']}")


class Waiting(Exception):
    """The work cannot start yet (no GPU room beside serving): the job goes back to the queue."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Stopped(Exception):
    """The work stopped because it was asked to (a running job cancelled); `result` is what it leaves."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.message, self.result = message, result


def _store(settings: ObjectStoreSettings | None) -> ObjectStore:
    if settings is None:
        raise StorageUnavailable("No object store is configured (profile storage.object_store): the registries need one.")
    return settings.open()


def _sized(path: Path) -> str:
    """The path with its size, where it is a file or a folder."""
    if path.is_file():
        return f"{path} ({path.stat().st_size} bytes)"
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return f"{path} ({len(files)} files, {sum(p.stat().st_size for p in files)} bytes)"
    return str(path)


def _model_import(work: Work) -> tuple[dict, dict]:
    params, path = work.params, Path(work.params["path"])
    work.note(f"reading the model card of {_sized(path)}, then hashing and uploading it "
              f"to the object store at {work.store.location}")
    row = model_registry.register(work.db, work.store, params["name"], path, source=params["path"],
                                  created_by=work.actor.key_id, sha256=params["sha256"])
    work.note(f"registered model {row['model']} version {row['version']}, sha256 {row['sha256']}")
    work.registered(row)
    result = {"model": row["model"], "version": row["version"], "sha256": row["sha256"], "size": row["size"]}
    return result, {k: result[k] for k in ("version", "sha256", "size")}


def _dataset_import(work: Work) -> tuple[dict, dict]:
    params, path = work.params, Path(work.params["path"])
    work.note(f"loading {_sized(path)} for its schema, quality report and PII scan, then hashing and uploading it "
              f"to the object store at {work.store.location}")
    row = dataset_registry.register(work.db, work.store, params["name"], path, source=params["path"],
                                    created_by=work.actor.key_id, fmt=params["format"], sha256=params["sha256"])
    work.note(f"registered dataset {row['dataset']} version {row['version']} ({row['rows']} rows), "
              f"sha256 {row['sha256']}")
    result = {"dataset": row["dataset"], "version": row["version"], "sha256": row["sha256"], "rows": row["rows"]}
    return result, {k: result[k] for k in ("version", "sha256", "rows")}


def _evaluate(work: Work) -> tuple[dict, dict]:
    from services.worker.evaluation import evaluate  # sacrebleu, rouge-score, kiwipiepy: loaded for evaluation only

    return evaluate(work)


def _gate(work: Work) -> tuple[dict, dict]:
    from services.worker.gates import check

    return check(work)


def _finetune(work: Work) -> tuple[dict, dict]:
    require_training_stack()  # the worker's install may differ from the gateway's
    from services.worker.training import finetune  # torch and transformers: loaded for training only

    return finetune(work)


# kind -> (audit action, audit target kind, work(Work) -> (result, audit detail)): a job is
# audited as the /admin call that does the same work synchronously.
WORK: dict[str, tuple[str, str, Callable[[Work], tuple[dict, dict]]]] = {
    "model.import": ("model.register", "model", _model_import),
    "dataset.import": ("dataset.register", "dataset", _dataset_import),
    "finetune": ("model.finetune", "model", _finetune),
    "eval": ("model.evaluate", "model", _evaluate),
    "gate": ("model.gate", "model", _gate),
}


WAIT_RETRY_S = 30.0  # a waiting job is tried again after this long


class JobRunner:
    def __init__(self, home: Path, store: ObjectStoreSettings | None, served: Sequence[ServedModel] = (),
                 tracer=None):
        self.home = home
        self.store = store
        self.served = served
        self.tracer = tracer  # an OpenTelemetry tracer: a span per job (services/gateway/tracing.py); None: off
        self.later: Callable[[str, float], None] | None = None  # queues a job again after a delay (the queue's)
        self.enqueue: Callable[[str], None] | None = None  # queues a job (the queue's)

    def __call__(self, job_id: str) -> None:
        db = open_db(state_db_path(self.home), migrate=False)
        try:
            job = jobs.claim(db, job_id)
            if job is None:
                log.info("job %s is not queued any more (cancelled); skipped", job_id)
                return
            span = None if self.tracer is None else self.tracer.start_span(
                f"job {job['kind']}", attributes={"appliance.job.id": job_id, "appliance.job.kind": job["kind"]})
            try:
                self._run(db, job)
            finally:
                if span is not None:
                    state = jobs.get(db, job_id)["state"]
                    span.set_attribute("appliance.job.state", state)
                    if state == "failed":
                        span.set_status(StatusCode.ERROR)
                    span.end()
        finally:
            db.conn.close()

    def _run(self, db, job: dict) -> None:
        actor, params = jobs.actor_of(job), job["params"]
        action, what, work = WORK[job["kind"]]
        target = f"{what}/{params['name']}"
        log.info("job %s (%s) started", job["id"], job["kind"])
        try:
            result, detail = work(Work(db, _store(self.store), job, self.home, self.served, self.enqueue))
        except Waiting as exc:
            jobs.wait(db, job["id"], exc.message)
            self.later(job["id"], WAIT_RETRY_S)
            log.info("job %s waits: %s", job["id"], exc.message)
        except Stopped as exc:
            jobs.stopped(db, job["id"], exc.message, exc.result)
            audit.record(db, actor, action, target, outcome="cancelled", detail=exc.result)
            log.info("job %s stopped: %s", job["id"], exc.message)
        except ApplianceError as exc:
            jobs.finish(db, job["id"], error=exc.message)
            audit.record(db, actor, action, target, outcome=f"refused: {exc.message}")
            log.info("job %s refused: %s", job["id"], exc.message)
        except Exception as exc:
            log.exception("job %s failed", job["id"])
            jobs.finish(db, job["id"], error=f"{type(exc).__name__}: {exc}")
            audit.record(db, actor, action, target, outcome=f"error: {type(exc).__name__}")
        else:
            jobs.finish(db, job["id"], result=result)
            audit.record(db, actor, action, target, detail=detail)
            log.info("job %s succeeded: %s", job["id"], result)
