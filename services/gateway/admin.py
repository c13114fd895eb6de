"""The admin API under /admin: model registry, deployments, uploads and the audit log.

Every call needs an admin or operator key. Handlers do their database and object-store
work on a worker thread with a connection of their own, and every change is written to
the audit log with its outcome, refused or not, in the same place.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.exceptions import ClientException, InternalServerException

from appliance import audit, deployments, model_registry
from appliance.audit import Actor
from appliance.db import open_db
from appliance.errors import ApplianceError, InvalidRequest, PermissionDenied, StorageUnavailable
from appliance.objectstore import ObjectStore
from services.gateway import schemas
from services.gateway.request_ids import new_request_id

ADMIN_ROLES = ("admin", "operator")


def gateway_of(request: Request):
    return request.app.state.gateway


def authorize(request: Request) -> Actor:
    key = gateway_of(request).keys.authenticate(request.headers.get("authorization"))
    if key.role not in ADMIN_ROLES:
        raise PermissionDenied(f"/admin needs an admin or operator key; this key's role is {key.role!r}.")
    return Actor(key.id, key.name, key.role, new_request_id())


def store_of(request: Request) -> ObjectStore:
    store = gateway_of(request).store
    if store is None:
        raise StorageUnavailable(
            "No object store is configured (profile storage.object_store is 'none', or 'auto' found no MinIO binary): "
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


async def receive_file(request: Request, folder: Path, filename: str) -> Path:
    """Stream the request body to folder/<random>/<filename>; the registry hashes it once, when storing it.

    A body shorter than its Content-Length (a client that hung up) is refused and removed.
    The caller removes the file (and its folder) with `discard`.
    """
    name = os.path.basename(filename or "")
    if not name or name in (".", ".."):
        raise InvalidRequest("give the file's name with ?filename=NAME (its extension tells the format)", param="filename")
    path = staging_path(folder, name, name)
    size = 0
    expected = request.headers.get("content-length")
    try:
        with open(path, "wb") as f:
            async for chunk in request.stream():
                f.write(chunk)
                size += len(chunk)
        if expected is not None and expected.isdigit() and size != int(expected):
            raise InvalidRequest(f"truncated upload: received {size} of {expected} bytes; nothing was registered",
                                 code="truncated_upload")
        if size == 0:
            raise InvalidRequest("the upload is empty", param="body")
    except (ClientException, InternalServerException) as exc:  # the client went away mid-body
        discard(path)
        raise InvalidRequest(f"the upload did not complete ({exc.detail}); nothing was registered",
                             code="truncated_upload") from None
    except BaseException:
        discard(path)
        raise
    return path


def staging_path(folder: Path, filename: str | None, default: str) -> Path:
    """folder/<random>/<filename>: a private place for one file, keeping its name."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder, prefix="upload-")) / (os.path.basename(filename or "") or default)


def discard(path: Path) -> None:
    shutil.rmtree(path.parent, ignore_errors=True)


# register(db, local path, source) -> the new version's row
Register = Callable[[Any, Path, str], dict]


def from_path_or_upload(request: Request, body, bucket: str, register: Register) -> Callable[[Any], dict]:
    """The work of POST .../versions: register `body.path` (a path on the gateway's machine) or
    the file staged at `body.upload_key` by a presigned PUT, which is removed afterwards."""
    if (body.path is None) == (body.upload_key is None):
        raise InvalidRequest("give exactly one of 'path' (on the gateway's machine) or 'upload_key'", param="path")
    if body.upload_key is not None and not re.fullmatch(r"uploads/[0-9a-f]{32}", body.upload_key):
        raise InvalidRequest(f"{body.upload_key!r} is not an upload key from POST /admin/uploads", param="upload_key")
    store, folder = store_of(request), uploads_dir(request)

    def work(db) -> dict:
        if body.path is not None:
            return register(db, Path(body.path), body.path)
        staged = staging_path(folder, body.filename, bucket)
        try:
            store.fetch_upload(bucket, body.upload_key, staged)
            return register(db, staged, f"upload {staged.name}")
        finally:
            discard(staged)
            store.delete(bucket, body.upload_key)

    return work


async def from_body(request: Request, filename: str, register: Register) -> Callable[[Any], dict]:
    """The work of POST .../upload: register the request body, streamed to a staging file."""
    path = await receive_file(request, uploads_dir(request), filename)

    def work(db) -> dict:
        try:
            return register(db, path, f"upload {path.name}")
        finally:
            discard(path)

    return work


def uploads_dir(request: Request) -> Path:
    return Path(gateway_of(request).runtime.home) / "tmp"


def cache_dir(request: Request, kind: str) -> Path:
    """Local copies of stored files (checked against their SHA-256 when fetched)."""
    path = Path(gateway_of(request).runtime.home) / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- models ---------------------------------------------------------------------------


class RegisterModel(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None  # a GGUF file or HF directory on the gateway's machine
    upload_key: str | None = None  # from POST /admin/uploads, after the PUT to its URL
    filename: str | None = None  # the upload's file name (its extension tells the format)
    sha256: str | None = None  # expected digest: a mismatch registers nothing


class Deploy(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    version: Annotated[int, msgspec.Meta(ge=1)]
    name: str | None = None
    replicas: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    context_length: Annotated[int, msgspec.Meta(ge=128)] | None = None


class UploadRequest(msgspec.Struct, forbid_unknown_fields=True):
    bucket: Literal["models", "datasets"]


def _version_detail(row: dict) -> dict:
    return {"version": row["version"], "sha256": row["sha256"], "size": row["size"]}


@get("/admin/models")
async def list_models(request: Request) -> Response:
    return await run(request, authorize(request), model_registry.list_models)


@get("/admin/models/{name:str}")
async def model_versions(request: Request, name: str) -> Response:
    return await run(request, authorize(request), lambda db: {"name": name, "versions": model_registry.versions(db, name)})


@post("/admin/models/{name:str}/versions")
async def register_model(request: Request, name: str) -> Response:
    actor = authorize(request)
    body = schemas.decode(await request.body(), RegisterModel)
    work = from_path_or_upload(request, body, "models", _model_register(request, actor, name, body.sha256))
    return await run(request, actor, work, action="model.register", target=f"model/{name}", detail=_version_detail,
                     status=201)


@post("/admin/models/{name:str}/upload", request_max_body_size=None)
async def upload_model(request: Request, name: str, filename: str, sha256: str | None = None) -> Response:
    """The model file as the request body (e.g. curl -T model.gguf)."""
    actor = authorize(request)
    register = _model_register(request, actor, model_registry.check_name(name), sha256)
    work = await from_body(request, filename, register)
    return await run(request, actor, work, action="model.register", target=f"model/{name}", detail=_version_detail,
                     status=201)


def _model_register(request: Request, actor: Actor, name: str, sha256: str | None) -> Register:
    store = store_of(request)
    return lambda db, path, source: model_registry.register(db, store, name, path, source=source,
                                                            created_by=actor.key_id, sha256=sha256)


@get("/admin/models/{name:str}/versions/{version:int}")
async def get_model_version(request: Request, name: str, version: int) -> Response:
    return await run(request, authorize(request), lambda db: model_registry.get_version(db, name, version))


@patch("/admin/models/{name:str}/versions/{version:int}/card")
async def edit_card(request: Request, name: str, version: int) -> Response:
    actor = authorize(request)
    try:
        edits = msgspec.json.decode(await request.body(), type=dict[str, Any])
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body must be a JSON object of card fields: {exc}") from None
    return await run(request, actor, lambda db: model_registry.edit_card(db, name, version, edits),
                     action="model.card.edit", target=f"model/{name}/{version}", detail=lambda _: {"fields": sorted(edits)})


@get("/admin/models/{name:str}/compare")
async def compare_versions(request: Request, name: str, a: int, b: int) -> Response:
    return await run(request, authorize(request), lambda db: model_registry.compare(db, name, a, b))


@delete("/admin/models/{name:str}/versions/{version:int}", status_code=200)
async def delete_model_version(request: Request, name: str, version: int) -> Response:
    actor = authorize(request)
    store = store_of(request)
    return await run(request, actor, lambda db: model_registry.delete_version(db, store, name, version),
                     action="model.delete", target=f"model/{name}/{version}", detail=_version_detail)


# --- deployments ----------------------------------------------------------------------


@get("/admin/deployments")
async def list_deployments(request: Request) -> Response:
    return await run(request, authorize(request), deployments.list_all)


@get("/admin/deployments/{name:str}")
async def get_deployment(request: Request, name: str) -> Response:
    return await run(request, authorize(request), lambda db: deployments.get(db, name))


@post("/admin/deployments")
async def create_deployment(request: Request) -> Response:
    actor = authorize(request)
    body = schemas.decode(await request.body(), Deploy)
    store_of(request)  # the engine's files come from the object store
    reserved = gateway_of(request).profile_models

    def work(db):
        return deployments.deploy(db, body.model, body.version, name=body.name, replicas=body.replicas,
                                  context_length=body.context_length, reserved=reserved, created_by=actor.key_id)

    return await run(request, actor, work, action="deployment.create", target=f"deployment/{body.name or body.model}",
                     detail=lambda row: {"model": row["model"], "version": row["version"], "replicas": row["replicas"]},
                     status=201)


@delete("/admin/deployments/{name:str}", status_code=200)
async def delete_deployment(request: Request, name: str) -> Response:
    actor = authorize(request)
    return await run(request, actor, lambda db: deployments.undeploy(db, name), action="deployment.delete",
                     target=f"deployment/{name}")


# --- uploads and audit ----------------------------------------------------------------


@post("/admin/uploads")
async def create_upload(request: Request) -> Response:
    """A presigned URL for one large file: PUT it there, then register it with its upload_key."""
    actor = authorize(request)
    body = schemas.decode(await request.body(), UploadRequest)
    store = store_of(request)

    def work(db):
        key, url = store.presigned_upload(body.bucket)
        return {"bucket": body.bucket, "upload_key": key, "url": url, "method": "PUT",
                "headers": {"Content-Type": "application/octet-stream"}, "expires_in_s": 3600}

    return await run(request, actor, work, action="upload.create", target=f"{body.bucket}/uploads",
                     detail=lambda r: {"upload_key": r["upload_key"]}, status=201)


@get("/admin/audit")
async def audit_log(request: Request, limit: int = 100, action: str | None = None, target: str | None = None) -> Response:
    if not 1 <= limit <= 10_000:
        raise InvalidRequest("limit must be between 1 and 10000", param="limit")
    return await run(request, authorize(request), lambda db: audit.entries(db, limit=limit, action=action, target=target))


ADMIN_HANDLERS = [
    list_models, model_versions, register_model, upload_model, get_model_version, edit_card, compare_versions,
    delete_model_version, list_deployments, get_deployment, create_deployment, delete_deployment, create_upload,
    audit_log,
]
