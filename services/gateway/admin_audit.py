"""The audit log in the admin API: /admin/audit."""

from __future__ import annotations

from litestar import Controller, Request, Response, get

from appliance import audit
from appliance.audit import Actor
from appliance.errors import InvalidRequest
from services.gateway.admin import run


class AuditController(Controller):
    path = "/audit"
    tags = ["audit"]

    @get()
    async def audit_log(self, request: Request, actor: Actor, limit: int = 100, action: str | None = None,
                        target: str | None = None) -> Response:
        if not 1 <= limit <= 10_000:
            raise InvalidRequest("limit must be between 1 and 10000", param="limit")
        return await run(request, actor, lambda db: audit.entries(db, limit=limit, action=action, target=target))
