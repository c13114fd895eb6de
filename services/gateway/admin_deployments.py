"""Deployments of registered model versions in the admin API: /admin/deployments."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post

from appliance import deployments
from appliance.audit import Actor
from services.gateway.admin import SQLITE_MAX, decoded, gateway_of, request_body, run, store_of


class Deploy(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    version: Annotated[int, msgspec.Meta(ge=1, le=SQLITE_MAX)]
    name: str | None = None
    replicas: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    context_length: Annotated[int, msgspec.Meta(ge=128, le=SQLITE_MAX)] | None = None
    force: bool = False  # deploy a version that has not passed its model's quality gate


class DeploymentController(Controller):
    path = "/deployments"
    tags = ["deployments"]

    @get()
    async def list_deployments(self, request: Request, actor: Actor) -> Response:
        return await run(request, actor, deployments.list_all)

    @get("/{name:str}")
    async def get_deployment(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: deployments.get(db, name))

    @post(opt=request_body(Deploy))
    async def create_deployment(self, request: Request, actor: Actor) -> Response:
        body = await decoded(request)
        store_of(request)  # the engine's files come from the object store
        reserved = gateway_of(request).profile_models

        def work(db):
            return deployments.deploy(db, body.model, body.version, name=body.name, replicas=body.replicas,
                                      context_length=body.context_length, reserved=reserved, created_by=actor.key_id,
                                      force=body.force)

        return await run(request, actor, work, action="deployment.create",
                         target=f"deployment/{body.name or body.model}",
                         detail=lambda row: {"model": row["model"], "version": row["version"], "replicas": row["replicas"],
                                             **({"forced_past_gate": True} if body.force else {})},
                         status=201)

    @delete("/{name:str}", status_code=200)
    async def delete_deployment(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: deployments.undeploy(db, name), action="deployment.delete",
                         target=f"deployment/{name}")
