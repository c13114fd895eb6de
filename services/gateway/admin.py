"""What every controller of the admin API (/admin) shares: who is asking, the permission
guard, and running a handler's work off the event loop with its audit record.

The guard authenticates the caller (an API key, a password session or an identity
provider's JWT: appliance/auth.py) and checks that its role holds the permission the
route needs (appliance/permissions.py) before a handler runs; the handler gets the caller
as `actor`. Work runs on a worker thread with a database connection of its own, and every
change is written to the audit log with its outcome, refused or not, in the same place.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.params import Parameter

from appliance import audit, budgets, permissions
from appliance.audit import Actor
from appliance.db import open_db
from appliance.errors import ApplianceError, StorageUnavailable
from appliance.governance import Limits, Principal
from appliance.objectstore import ObjectStore
from services.gateway import schemas
from services.gateway.request_ids import new_request_id

MANAGER_ROLES = permissions.at_least("operator")  # see everyone's things; handlers scope other roles to their own
# SQLite's integers are 64-bit: a larger one from a client is a 400 naming it, not an OverflowError.
SQLITE_MIN, SQLITE_MAX = -(2**63), 2**63 - 1
SqliteInt = Annotated[int, msgspec.Meta(ge=SQLITE_MIN, le=SQLITE_MAX)]  # in a request body
VersionNumber = Annotated[int, Parameter(ge=1, le=SQLITE_MAX)]  # a registry version, in a path or query


def gateway_of(connection: ASGIConnection):
    return connection.app.state.gateway


async def principal_of(connection: ASGIConnection) -> Principal:
    """The caller, authenticated once per request (401 without a valid key, session or token)."""
    principal = connection.scope.get("principal")
    if principal is None:
        principal = await gateway_of(connection).authenticate(connection.headers.get("authorization"))
        connection.scope["principal"] = principal
    return principal


async def requires_permission(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """The admin router's guard: the caller's role must hold the route's permission (403 naming both)."""
    caller = await principal_of(connection)
    permissions.check(caller.role, connection.scope["method"], connection.scope["path_template"])


def request_body(schema: Any) -> dict:
    """A handler's `opt`: the JSON body it reads with `decoded`, which the OpenAPI document
    describes too (services/gateway/openapi.py); `bytes` for a raw file body."""
    return {"body": schema}


async def decoded(request: Request, *, required: bool = True) -> Any:
    """The request body as its handler's `body` type; 400 naming the field at fault.
    An empty body that is not `required` is the type's defaults."""
    schema, raw = request.route_handler.opt["body"], await request.body()
    return schemas.decode(raw, schema) if required or raw.strip() else schema()


async def current_actor(request: Request) -> Actor:
    """The `actor` dependency: the guarded caller, with a fresh request id for this call."""
    caller = await principal_of(request)
    return Actor(caller.key_id, caller.name, caller.role, new_request_id(), caller.user_id, caller.team_id)


def spending(connection: ASGIConnection) -> Callable[[Sequence[tuple[str, Limits]]], list[budgets.Spend | None]]:
    """For a handler's work, on its thread: the `spend` of each (ledger subject, limits) that sets a
    budget, None for the others, read from this worker's ledger at once (appliance/budgets.py)."""
    gateway = gateway_of(connection)
    return functools.partial(budgets.spending, gateway.governor, currency=gateway.runtime.costs.currency)


def store_of(connection: ASGIConnection) -> ObjectStore:
    store = gateway_of(connection).store
    if store is None:
        raise StorageUnavailable(
            "No object store is configured (profile storage.object_store is 'none'): "
            "the registries need one."
        )
    return store


async def run(request: Request, actor: Actor, work: Callable[[Any], Any], *, action: str | None = None,
              target: str = "", detail: Callable[[Any], dict] | None = None, status: int = 200) -> Response:
    """`perform` the work and answer its result as JSON."""
    result = await perform(request, actor, work, action=action, target=target, detail=detail)
    return Response(msgspec.json.encode(result), status_code=status, media_type="application/json",
                    headers={"x-request-id": actor.request_id})


async def perform(request: Request, actor: Actor, work: Callable[[Any], Any], *, action: str | None = None,
                  target: str = "", detail: Callable[[Any], dict] | None = None) -> Any:
    """Run `work(db)` on a thread with a connection of its own; audit it when it is a change (`action`)."""
    gateway = gateway_of(request)

    def job():
        db = open_db(gateway.db_path, migrate=False)
        try:
            try:
                result = work(db)
            except ApplianceError as exc:
                exc.request_id = actor.request_id
                if action:
                    audit.record(db, actor, action, target, outcome=f"refused: {exc.message}")
                raise
            except Exception as exc:
                if action:
                    audit.record(db, actor, action, target, outcome=f"error: {type(exc).__name__}")
                raise
            if action:
                audit.record(db, actor, action, target, detail=detail(result) if detail else None)
            return result
        finally:
            db.conn.close()

    return await asyncio.to_thread(job)
