"""The model registry in the admin API: /admin/models."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put

from appliance import gates, model_registry
from appliance.audit import Actor
from services.gateway.admin import VersionNumber, decoded, gateway_of, request_body, run, store_of
from services.gateway.admin_uploads import Register, from_body, from_path_or_upload


class RegisterModel(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None  # a GGUF file or HF directory on the gateway's machine
    upload_key: str | None = None  # from POST /admin/uploads, after the PUT to its URL
    filename: str | None = None  # the upload's file name (its extension tells the format)
    sha256: str | None = None  # expected digest: a mismatch registers nothing


def _version_detail(row: dict) -> dict:
    return {"version": row["version"], "sha256": row["sha256"], "size": row["size"]}


def _register(request: Request, actor: Actor, name: str, sha256: str | None) -> Register:
    store, queue = store_of(request), gateway_of(request).job_queue

    def register(db, path, source) -> dict:
        row = model_registry.register(db, store, name, path, source=source, created_by=actor.key_id, sha256=sha256)
        if row["gate"] is not None:  # a gated model: its evaluation runs on the worker
            queue.enqueue(row["gate"]["job"])
        return row

    return register


class ModelController(Controller):
    path = "/models"
    tags = ["models"]

    @get()
    async def list_models(self, request: Request, actor: Actor) -> Response:
        return await run(request, actor, model_registry.list_models)

    @get("/{name:str}")
    async def model_versions(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: {"name": name, "versions": model_registry.versions(db, name)})

    @post("/{name:str}/versions", opt=request_body(RegisterModel))
    async def register_model(self, request: Request, actor: Actor, name: str) -> Response:
        body = await decoded(request)
        work = from_path_or_upload(request, actor, body, "models", _register(request, actor, name, body.sha256))
        return await run(request, actor, work, action="model.register", target=f"model/{name}",
                         detail=_version_detail, status=201)

    @post("/{name:str}/upload", request_max_body_size=None, opt=request_body(bytes))
    async def upload_model(self, request: Request, actor: Actor, name: str, filename: str,
                           sha256: str | None = None) -> Response:
        """The model file as the request body (e.g. curl -T model.gguf)."""
        register = _register(request, actor, model_registry.check_name(name), sha256)
        work = await from_body(request, filename, register)
        return await run(request, actor, work, action="model.register", target=f"model/{name}",
                         detail=_version_detail, status=201)

    @get("/{name:str}/versions/{version:int}")
    async def get_model_version(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> Response:
        return await run(request, actor, lambda db: model_registry.get_version(db, name, version))

    @patch("/{name:str}/versions/{version:int}/card", opt=request_body(dict[str, Any]))
    async def edit_card(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> Response:
        edits = await decoded(request)  # the card fields to change
        return await run(request, actor, lambda db: model_registry.edit_card(db, name, version, edits),
                         action="model.card.edit", target=f"model/{name}/{version}",
                         detail=lambda _: {"fields": sorted(edits)})

    @get("/{name:str}/compare")
    async def compare_versions(self, request: Request, actor: Actor, name: str, a: VersionNumber,
                               b: VersionNumber) -> Response:
        return await run(request, actor, lambda db: model_registry.compare(db, name, a, b))

    @get("/{name:str}/gate")
    async def get_gate(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: gates.get_gate(db, name))

    @put("/{name:str}/gate", opt=request_body(gates.Gate))
    async def set_gate(self, request: Request, actor: Actor, name: str) -> Response:
        """Set or replace the model's quality gate: what a new version must score before it may be deployed."""
        body = await decoded(request)
        served = set(gateway_of(request).pools)
        return await run(request, actor, lambda db: gates.set_gate(db, name, body, served=served,
                                                                    created_by=actor.key_id),
                         action="model.gate.set", target=f"model/{name}",
                         detail=lambda gate: {k: gate[k] for k in ("dataset", "dataset_version", "metric", "max_drop",
                                                                   "min_score")})

    @delete("/{name:str}/gate", status_code=200)
    async def delete_gate(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: gates.delete_gate(db, name), action="model.gate.delete",
                         target=f"model/{name}")

    @post("/{name:str}/versions/{version:int}/gate")
    async def check_gate(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> Response:
        """Evaluate a version against the gate now (one registered before the gate was set, or again):
        202 with the version, its gate pending on the job."""
        queue = gateway_of(request).job_queue

        def work(db) -> dict:
            row = gates.schedule(db, model_registry.get_version(db, name, version), required=True)
            queue.enqueue(row["gate"]["job"])
            return row

        return await run(request, actor, work, action="model.gate.check", target=f"model/{name}/{version}",
                         detail=lambda row: {"job": row["gate"]["job"]}, status=202)

    @delete("/{name:str}/versions/{version:int}", status_code=200)
    async def delete_model_version(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> Response:
        store = store_of(request)
        return await run(request, actor, lambda db: model_registry.delete_version(db, store, name, version),
                         action="model.delete", target=f"model/{name}/{version}", detail=_version_detail)
