"""Evaluations in the admin API: /admin/evaluations (appliance/evaluation.py). An evaluation is
started as a job (POST /admin/jobs, kind "eval") and is a run (/admin/runs/{id}, .../samples)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get
from litestar.params import Parameter

from appliance import evaluation
from appliance.audit import Actor
from services.gateway.admin import run
from services.gateway.admin_experiments import run_ids


class EvaluationController(Controller):
    path = "/evaluations"
    tags = ["experiments"]

    @get("/compare")
    async def compare(self, request: Request, actor: Actor, ids: str, metric: str | None = None,
                      limit: Annotated[int, Parameter(ge=0, le=10_000)] = evaluation.COMPARED_SAMPLES) -> Response:
        """Evaluation runs of one dataset side by side (ids=a,b[,c], the first the baseline): their
        aggregates metric by metric, and the samples whose `metric` score changed, most first."""
        named = run_ids(ids)
        return await run(request, actor, lambda db: evaluation.compare(db, named, metric=metric, limit=limit))
