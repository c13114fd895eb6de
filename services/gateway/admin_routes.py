"""Routes in the admin API: /admin/routes (appliance/routes.py).

A route set here replaces the profile's route of its name until it is deleted; the gateway
serves a change within a second, without a restart. `live` is what this gateway serves
now: each target's and fallback's state (services/gateway/routing.py route_readiness).
"""

from __future__ import annotations

import time

import msgspec
from litestar import Controller, Request, Response, delete, get, put

from appliance import routes
from appliance.audit import Actor
from appliance.config import RouteSpec, RouteTarget, ShadowSpec
from appliance.errors import invalid_value
from services.gateway.admin import decoded, gateway_of, request_body, run
from services.gateway.routing import route_readiness


SHADOW_WINDOW_S = 86400


class SetRoute(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A route's targets (1 to 16, at least one weight above 0) and fallbacks (up to 8), all served
    models, each named once; the route's name is the path's."""

    targets: list[RouteTarget]
    fallbacks: list[str] = []
    shadow: ShadowSpec | None = None


def _spec(name: str, body: SetRoute) -> RouteSpec:
    """The route as the profile would have it; 400 naming the field (`name` for the path's)."""
    try:
        return msgspec.convert(msgspec.to_builtins(body) | {"name": name}, RouteSpec)
    except msgspec.ValidationError as exc:
        raise invalid_value(exc) from None


def _live(request: Request) -> dict[str, dict]:
    """The state of every route this gateway serves, taken on the event loop that changes it."""
    gateway = gateway_of(request)
    return {name: route_readiness(route, gateway.pool_of) for name, route in gateway.routes.items()}


def _with_live(route: dict, live: dict[str, dict]) -> dict:
    return route | {"live": live[route["name"]]} if route["name"] in live else route


def _detail(route: dict) -> dict:
    """A change's audit detail: the targets with their weights, and the fallbacks."""
    return {"targets": [{"model": t["model"], "weight": t["weight"]} for t in route["targets"]],
            "fallbacks": route["fallbacks"], "shadow": route["shadow"]}


class RouteController(Controller):
    path = "/routes"
    tags = ["routes"]

    @get()
    async def list_routes(self, request: Request, actor: Actor) -> Response:
        """The profile's routes and those set here (`source`), each with `live` when served."""
        profile, live = gateway_of(request).runtime.routes, _live(request)
        return await run(request, actor, lambda db: [_with_live(r, live) for r in routes.list_all(db, profile)])

    @get("/{name:str}")
    async def get_route(self, request: Request, actor: Actor, name: str) -> Response:
        """The route, with `live` when served, and `shadow_results`: its shadow traffic of the last day."""
        profile, live = gateway_of(request).runtime.routes, _live(request)

        def work(db) -> dict:
            route = _with_live(routes.get(db, name, profile), live)
            return route | {"shadow_results": routes.shadow_summary(db, name, time.time() - SHADOW_WINDOW_S)}

        return await run(request, actor, work)

    @put("/{name:str}", opt=request_body(SetRoute))
    async def set_route(self, request: Request, actor: Actor, name: str) -> Response:
        """Create or replace the route `name`: weighted targets and fallbacks, all served models."""
        spec = _spec(name, await decoded(request))
        gateway = gateway_of(request)
        served, profile = set(gateway.pools) | set(gateway.versions), gateway.runtime.routes

        def work(db) -> dict:
            return routes.put(db, spec, served=served, by=actor.key_id, profile_routes=profile)

        return await run(request, actor, work, action="route.set", target=f"route/{name}", detail=_detail)

    @delete("/{name:str}", status_code=200)
    async def delete_route(self, request: Request, actor: Actor, name: str) -> Response:
        """Delete the route set here; the profile's route of its name, if any, is served again."""
        profile = gateway_of(request).runtime.routes
        return await run(request, actor, lambda db: routes.delete(db, name, profile), action="route.delete",
                         target=f"route/{name}")
