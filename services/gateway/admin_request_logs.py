"""Request logs in the admin API: /admin/request-logs (appliance/request_logs.py).

Listing gives who asked which model when and how it ended; one request's entry gives its
masked request and answer, and reading it is audited (request_log.read)."""

from __future__ import annotations

import time
from typing import Annotated

from litestar import Controller, Request, Response, get
from litestar.params import Parameter

from appliance import request_logs
from appliance.audit import Actor
from services.gateway.admin import run
from services.gateway.admin_usage import moment_of


class RequestLogController(Controller):
    path = "/request-logs"
    tags = ["request logs"]

    @get()
    async def list_request_logs(self, request: Request, actor: Actor, since: str | None = None,
                                team: str | None = None, key: str | None = None, model: str | None = None,
                                status: Annotated[int, Parameter(ge=100, le=599)] | None = None,
                                limit: Annotated[int, Parameter(ge=1, le=10_000)] = 100) -> Response:
        """Kept requests, newest first, without their bodies: since a duration before now (24h) or an ISO
        date or time, of a team id, a key id, a model, a status."""
        since_ts = moment_of(since, time.time(), "since")
        return await run(request, actor, lambda db: request_logs.search(
            db, since=since_ts, team_id=team, key_id=key, model=model, status=status, limit=limit))

    @get("/{request_id:str}")
    async def get_request_log(self, request: Request, actor: Actor, request_id: str) -> Response:
        """One kept request by its id (a response's x-request-id): its request and answer, PII masked."""
        return await run(request, actor, lambda db: request_logs.get(db, request_id), action="request_log.read",
                         target=f"request/{request_id}", detail=lambda _: {})
