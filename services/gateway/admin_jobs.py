"""Background jobs in the admin API: /admin/jobs. The worker (services/worker) runs them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from appliance import audit, experiments, jobs, model_registry, permissions
from appliance.audit import Actor
from appliance.errors import InvalidRequest, ServiceUnavailable
from services.gateway.admin import SQLITE_MAX, decoded, gateway_of, perform, request_body, run, store_of

EVENTS_POLL_S = 0.5  # how often a job's event stream looks for new lines and metrics


class SubmitJob(msgspec.Struct, forbid_unknown_fields=True):
    kind: str  # one of appliance.jobs.KINDS
    params: dict[str, Any] = {}


def _register_profile_base(db, request: Request, name: str, actor: Actor) -> None:
    """A GGUF model the profile serves (the default model, say) is registered, its file as
    version 1, the first time a fine-tune names it as its base."""
    gateway = gateway_of(request)
    pool = gateway.pools.get(name)
    if name not in gateway.profile_models or pool.served.path is None or model_registry.has_versions(db, name):
        return
    path = Path(pool.served.path)
    if not path.is_file():
        raise InvalidRequest(f"model {name} is served from {path}, which is not on the gateway's machine: register "
                             f"its GGUF file (appliance models register {name} FILE)", param="params.base")
    row = model_registry.register(db, store_of(request), name, path, source=f"the profile's model {name}",
                                  created_by=actor.key_id)
    audit.record(db, actor, "model.register", f"model/{name}",
                 detail={"version": row["version"], "sha256": row["sha256"], "size": row["size"]})


class JobController(Controller):
    path = "/jobs"
    tags = ["jobs"]

    @post(opt=request_body(SubmitJob))
    async def submit_job(self, request: Request, actor: Actor) -> Response:
        """Queue a job; answers 202 with it (state "queued"). Follow it with GET /admin/jobs/{id}."""
        body = await decoded(request)
        params = jobs.parse_params(body.kind, body.params)  # a bad request is refused before anything is recorded
        if hasattr(params, "path"):  # it reads a file on the worker's machine
            permissions.require(actor.role, "files.server", param="params.path")
        gateway = gateway_of(request)
        queue = gateway.job_queue

        def work(db) -> dict:
            if body.kind == "finetune":
                _register_profile_base(db, request, params.base, actor)
            job = jobs.create(db, body.kind, jobs.prepare(db, body.kind, params, served=set(gateway.pools)), actor)
            try:
                queue.enqueue(job["id"])
            except Exception as exc:
                jobs.finish(db, job["id"], error=f"could not be queued: {exc}")
                raise ServiceUnavailable(f"the job queue (jobs.db) refused job {job['id']}: {exc}") from None
            return job

        return await run(request, actor, work, action="job.submit", target=f"jobs/{body.kind}",
                         detail=lambda job: {"id": job["id"], **job["params"]}, status=202)

    @get()
    async def list_jobs(self, request: Request, actor: Actor, limit: int = 100,
                        job_state: str | None = Parameter(query="state", default=None)) -> Response:
        if not 1 <= limit <= 10_000:
            raise InvalidRequest("limit must be between 1 and 10000", param="limit")
        return await run(request, actor, lambda db: jobs.list_jobs(db, state=job_state, limit=limit))

    @get("/{job_id:str}")
    async def get_job(self, request: Request, actor: Actor, job_id: str) -> Response:
        return await run(request, actor, lambda db: jobs.get(db, job_id))

    @get("/{job_id:str}/log")
    async def job_log(self, request: Request, actor: Actor, job_id: str,
                      after: Annotated[int, Parameter(ge=0, le=SQLITE_MAX)] = 0,
                      limit: Annotated[int, Parameter(ge=1, le=10_000)] = 1000) -> Response:
        """The job and its log lines numbered above `after`; `next` is the `after` of the next call."""

        def work(db) -> dict:
            job = jobs.get(db, job_id)  # read first: once it has finished, the lines read next are all there are
            lines = jobs.log_lines(db, job_id, after=after, limit=limit)
            return {"job": job, "lines": lines, "next": lines[-1]["seq"] if lines else after}

        return await run(request, actor, work)

    @get("/{job_id:str}/events")
    async def job_events(self, request: Request, actor: Actor, job_id: str,
                         after: Annotated[int, Parameter(ge=0, le=SQLITE_MAX)] = 0,
                         after_step: Annotated[int, Parameter(ge=0, le=SQLITE_MAX)] = 0) -> ServerSentEvent:
        """The job live, as server-sent events: `log` (each line numbered above `after`),
        `metrics` (each training step above `after_step`: loss, learning rate, tokens per
        second, step time), then `end` with the job once it has finished. A reconnecting
        client passes the last `seq` and `step` it saw."""
        await perform(request, actor, lambda db: jobs.get(db, job_id))  # 404 before the stream starts

        def read(db, seen: tuple[int, int]) -> tuple[dict, list[dict], list[dict]]:
            job = jobs.get(db, job_id)  # first: once it has finished, what is read next is all there is
            return job, jobs.log_lines(db, job_id, after=seen[0]), experiments.metrics(db, job_id, after_step=seen[1])

        async def events() -> AsyncIterator[ServerSentEventMessage]:
            seen = (after, after_step)
            while True:
                job, lines, steps = await perform(request, actor, lambda db: read(db, seen))
                for line in lines:
                    yield ServerSentEventMessage(msgspec.json.encode(line).decode(), event="log", id=str(line["seq"]))
                for step in steps:
                    yield ServerSentEventMessage(msgspec.json.encode(step).decode(), event="metrics")
                seen = (lines[-1]["seq"] if lines else seen[0], steps[-1]["step"] if steps else seen[1])
                if job["state"] in jobs.FINISHED and not lines and not steps:
                    yield ServerSentEventMessage(msgspec.json.encode(job).decode(), event="end")
                    return
                if not lines and not steps:
                    await asyncio.sleep(EVENTS_POLL_S)

        return ServerSentEvent(events(), headers={"x-request-id": actor.request_id})

    @post("/{job_id:str}/cancel")
    async def cancel_job(self, request: Request, actor: Actor, job_id: str) -> Response:
        """Cancel a queued job, or ask a running fine-tuning job to stop at its next step (409 for
        a finished job, or a running one of a kind that cannot stop)."""
        return await run(request, actor, lambda db: jobs.cancel(db, job_id, actor), action="job.cancel",
                         target=f"job/{job_id}")
