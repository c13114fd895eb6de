"""The appliance at a glance: /admin/system, for the admin console's dashboard.

The gateway's version, when it started and its worker processes; this machine's GPUs as
NVML reads them (in the gateway, or in a GPU sampler that has the devices it lacks); and,
where the state is replicated, how far each database's replica is behind
(services/gateway/system.py). With /readyz, /metrics and /admin/serving it is
everything the dashboard shows.
"""

from __future__ import annotations

from litestar import Controller, Request, get

from appliance.audit import Actor
from services.gateway.admin import gateway_of


class SystemController(Controller):
    path = "/system"
    tags = ["system"]

    @get()
    async def system(self, request: Request, actor: Actor) -> dict:
        return await gateway_of(request).system.snapshot()
