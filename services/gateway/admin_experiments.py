"""Experiment tracking in the admin API: /admin/experiments and /admin/runs (appliance/experiments.py).

A run is a fine-tuning or evaluation job in an experiment; its id is the job's. Runs are searched by
experiment, tag and parameter (`param.<dotted path>=<value>` query parameters), compared
side by side and exported as CSV or JSON.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, Response, get, patch
from litestar.params import Parameter

from appliance import evaluation, experiments
from appliance.audit import Actor
from appliance.errors import InvalidRequest
from services.gateway.admin import SQLITE_MAX, decoded, perform, request_body, run

PARAM_PREFIX = "param."  # GET /admin/runs?param.lora.rank=8
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


class TagChange(msgspec.Struct, forbid_unknown_fields=True):
    add_tags: list[str] = []
    remove_tags: list[str] = []


def run_ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",")]
    if not all(ids):
        raise InvalidRequest("ids: run ids separated by commas, none empty (ids=job_a,job_b)", param="ids")
    return ids


def _param_filters(request: Request) -> dict[str, str]:
    """The `param.<path>=<value>` query parameters, by path; one path given twice is a 400."""
    where: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith(PARAM_PREFIX):
            path = name[len(PARAM_PREFIX):]
            if path in where:
                raise InvalidRequest(f"{name} is given twice: give each parameter path once", param=name)
            where[path] = value
    return where


class ExperimentController(Controller):
    path = "/experiments"
    tags = ["experiments"]

    @get()
    async def list_experiments(self, request: Request, actor: Actor) -> Response:
        """Experiments by name, with how many runs each has and when the last began."""
        return await run(request, actor, experiments.list_experiments)


class RunController(Controller):
    path = "/runs"
    tags = ["experiments"]

    @get()
    async def list_runs(self, request: Request, actor: Actor, experiment: str | None = None, tag: str | None = None,
                        limit: Annotated[int, Parameter(ge=1, le=10_000)] = 1000) -> Response:
        """Runs, newest first; `param.<dotted path>=<value>` (repeatable, e.g. param.lora.rank=8) keeps
        the runs whose params hold that value, read as JSON when it parses and as a string otherwise."""
        where = _param_filters(request)
        return await run(request, actor, lambda db: experiments.list_runs(db, experiment, tag, where, limit=limit))

    @get("/compare")
    async def compare_runs(self, request: Request, actor: Actor, ids: str) -> Response:
        """Runs side by side (ids=a,b[,c], at most 10): params with those that differ marked, final
        metrics, and per-step metrics aligned by step (`steps`, `series[metric][run]`)."""
        named = run_ids(ids)
        return await run(request, actor, lambda db: experiments.compare(db, named))

    @get("/export")
    async def export_runs(self, request: Request, actor: Actor, format: Literal["csv", "json"],
                          experiment: str | None = None, ids: str | None = None) -> Response:
        """Every run of `experiment`, or the runs `ids` names, as CSV (a row per run: its params
        and final metrics as columns) or JSON (each run in full, with its per-step metrics)."""
        if (experiment is None) == (ids is None):
            raise InvalidRequest("give experiment=NAME or ids=RUN,RUN (one of the two)", param="experiment")
        chosen = experiment if experiment is not None else run_ids(ids)
        text = await perform(request, actor, lambda db: experiments.export(db, chosen, format))
        filename = f"{experiment if experiment is not None else 'runs'}.{format}"
        return Response(text.encode(), media_type=MEDIA_TYPES[format],
                        headers={"x-request-id": actor.request_id,
                                 "content-disposition": f'attachment; filename="{filename}"'})

    @get("/{run_id:str}")
    async def get_run(self, request: Request, actor: Actor, run_id: str) -> Response:
        """One run: params, tags, environment, artifacts, final and last metrics, its job's state, and
        its links (job, base model version, dataset version, the model version it made)."""
        return await run(request, actor, lambda db: experiments.get_run(db, run_id))

    @get("/{run_id:str}/metrics")
    async def run_metrics(self, request: Request, actor: Actor, run_id: str,
                          after: Annotated[int, Parameter(ge=0, le=SQLITE_MAX)] = 0,
                          limit: Annotated[int, Parameter(ge=1, le=10_000)] = experiments.METRICS_PAGE) -> Response:
        """The run's metrics of the steps above `after`, in step order; `next` is the `after` of the next call."""

        def work(db) -> dict:
            experiments.check_run(db, run_id)
            rows = experiments.metrics(db, run_id, after_step=after, limit=limit)
            return {"run": run_id, "metrics": rows, "next": rows[-1]["step"] if rows else after}

        return await run(request, actor, work)

    @get("/{run_id:str}/samples")
    async def run_samples(self, request: Request, actor: Actor, run_id: str,
                          after: Annotated[int, Parameter(ge=-1, le=SQLITE_MAX)] = -1,
                          limit: Annotated[int, Parameter(ge=1, le=10_000)] = evaluation.SAMPLES_PAGE) -> Response:
        """An evaluation run's samples after index `after` (input, reference, answer, scores, the
        judge's words, error); `next` is the `after` of the next call."""

        def work(db) -> dict:
            experiments.check_run(db, run_id)
            rows = evaluation.samples(db, run_id, after=after, limit=limit)
            return {"run": run_id, "samples": rows, "next": rows[-1]["idx"] if rows else after}

        return await run(request, actor, work)

    @patch("/{run_id:str}", opt=request_body(TagChange))
    async def tag_run(self, request: Request, actor: Actor, run_id: str) -> Response:
        """Add and remove the run's tags: {"add_tags": [...], "remove_tags": [...]}."""
        body = await decoded(request)
        return await run(request, actor, lambda db: experiments.tag_run(db, run_id, body.add_tags, body.remove_tags),
                         action="run.tag", target=f"run/{run_id}",
                         detail=lambda r: {"add": body.add_tags, "remove": body.remove_tags, "tags": r["tags"]})
