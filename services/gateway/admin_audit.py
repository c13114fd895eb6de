"""The audit log in the admin API: /admin/audit (newest entries), /admin/audit/verify (the
hash chain checked) and /admin/audit/export (every row as JSON lines, for a SIEM)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, Request, Response, get
from litestar.response import Stream

from appliance import audit
from appliance.audit import Actor
from appliance.errors import InvalidRequest
from services.gateway.admin import perform, run

EXPORT_PAGE = 5000  # rows read per database call while streaming an export


class AuditController(Controller):
    path = "/audit"
    tags = ["audit"]

    @get()
    async def audit_log(self, request: Request, actor: Actor, limit: int = 100, action: str | None = None,
                        target: str | None = None) -> Response:
        if not 1 <= limit <= 10_000:
            raise InvalidRequest("limit must be between 1 and 10000", param="limit")
        return await run(request, actor, lambda db: audit.entries(db, limit=limit, action=action, target=target))

    @get("/verify")
    async def verify(self, request: Request, actor: Actor) -> Response:
        """Walk the hash chain: `ok`, or the first bad row (`bad_id`), its `problem` and a `reason`."""
        return await run(request, actor, audit.verify)

    @get("/export")
    async def export(self, request: Request, actor: Actor, since: float | None = None,
                     until: float | None = None) -> Stream:
        """Rows stamped in [since, until) (Unix seconds), oldest first, one JSON object a line.
        The export itself is audited (`audit.export`)."""
        for name, value in (("since", since), ("until", until)):
            if value is not None and not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number of Unix seconds", param=name)
        await perform(request, actor, lambda db: None, action="audit.export", target="audit",
                      detail=lambda _: {"since": since, "until": until})

        async def lines() -> AsyncIterator[bytes]:
            after = 0
            while True:
                page = await perform(request, actor, lambda db: list(
                    audit.export(db, since, until, after_id=after, limit=EXPORT_PAGE)))
                if page:
                    yield b"".join(msgspec.json.encode(row) + b"\n" for row in page)
                    after = page[-1]["id"]
                if len(page) < EXPORT_PAGE:
                    return

        return Stream(lines(), media_type="application/x-ndjson", headers={"x-request-id": actor.request_id})
