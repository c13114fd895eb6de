"""Prompt templates in the admin API: /admin/prompts (appliance/prompts.py). Every gateway
worker renders a change within a second or so."""

from __future__ import annotations

import random
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put

from appliance import prompts
from appliance.audit import Actor
from services.gateway.admin import VersionNumber, decoded, request_body, run


class Weights(msgspec.Struct, forbid_unknown_fields=True):
    weights: dict[str, float]  # {version: weight}; {} sends every request to the latest version


class Preview(msgspec.Struct, forbid_unknown_fields=True):
    version: int | None = None
    variables: dict[str, Any] = {}


class PromptController(Controller):
    path = "/prompts"
    tags = ["prompts"]

    @get()
    async def list_templates(self, request: Request, actor: Actor) -> Response:
        return await run(request, actor, prompts.list_templates)

    @get("/{name:str}")
    async def get_template(self, request: Request, actor: Actor, name: str) -> Response:
        """The template, its A/B weights and every version."""
        return await run(request, actor, lambda db: prompts.get_template(db, name))

    @post("/{name:str}/versions", opt=request_body(prompts.NewVersion))
    async def create_version(self, request: Request, actor: Actor, name: str) -> Response:
        """A new version (the template is made by its first): its `system` and/or `user` Jinja2
        templates and the variables they use."""
        body = await decoded(request)
        return await run(request, actor, lambda db: prompts.create_version(db, name, body, created_by=actor.key_id),
                         action="prompt.version.create", target=f"prompt/{name}",
                         detail=lambda row: {"version": row["version"]}, status=201)

    @get("/{name:str}/versions/{version:int}")
    async def get_version(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> Response:
        return await run(request, actor, lambda db: prompts.get_version(db, name, version))

    @put("/{name:str}/ab", opt=request_body(Weights))
    async def set_ab(self, request: Request, actor: Actor, name: str) -> Response:
        """How requests that name no version are split between versions, by weight."""
        body = await decoded(request)
        return await run(request, actor, lambda db: prompts.set_ab(db, name, body.weights), action="prompt.ab.set",
                         target=f"prompt/{name}", detail=lambda template: {"ab": template["ab"]})

    @post("/{name:str}/render", opt=request_body(Preview), status_code=200)
    async def render(self, request: Request, actor: Actor, name: str) -> Response:
        """What a request naming the template would get: the version chosen and its rendered parts."""
        body = await decoded(request)

        def work(db) -> dict:
            template = prompts.load(db, name)
            version = template.choose(body.version, random.Random())
            return {"name": name, "version": version, **template.render(version, body.variables)}

        return await run(request, actor, work)

    @delete("/{name:str}", status_code=200)
    async def delete_template(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: prompts.delete_template(db, name), action="prompt.delete",
                         target=f"prompt/{name}", detail=lambda t: {"versions": len(t["versions"])})
