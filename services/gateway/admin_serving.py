"""What this gateway worker serves right now: /admin/serving.

Each served model with its replicas (health, supervisor state, circuit breaker, requests in
flight), its engine slots and wait queue, and its response cache; each route with the state
of its models. The same as /readyz's details plus the caches, for the admin console and
scripts, behind the admin API's permission guard. Breakers, queues and caches are each
worker's own: with several workers, each request may be answered by another.
"""

from __future__ import annotations

from litestar import Controller, Request, get

from appliance.audit import Actor
from services.gateway.admin import gateway_of
from services.gateway.routing import route_readiness


class ServingController(Controller):
    path = "/serving"
    tags = ["serving"]

    @get()
    async def serving(self, request: Request, actor: Actor) -> dict:
        gateway = gateway_of(request)
        models = {}
        for name, pool in gateway.pools.items():
            models[name] = pool.readiness() | {"cache": pool.cache.state() if pool.cache is not None else None}
        return {"models": models,
                "routes": {name: route_readiness(route, gateway.pool_of) for name, route in gateway.routes.items()}}
