"""The dataset registry in the admin API: /admin/datasets."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.response import File

from appliance import dataset_registry
from appliance.audit import Actor
from appliance.model_registry import check_name
from appliance.objectstore import StoredObject
from services.gateway.admin import SqliteInt, VersionNumber, decoded, perform, request_body, run, store_of
from services.gateway.admin_uploads import Register, cache_dir, from_body, from_path_or_upload

Format = Literal["csv", "jsonl", "parquet"]
MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


class RegisterDataset(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None  # a file on the gateway's machine
    upload_key: str | None = None  # from POST /admin/uploads (bucket datasets), after the PUT
    filename: str | None = None
    format: Format | None = None  # default: from the file name, else its content
    sha256: str | None = None


class SplitRequest(msgspec.Struct, forbid_unknown_fields=True):
    ratios: dict[str, Annotated[float, msgspec.Meta(ge=0, le=1)]] = msgspec.field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1})
    seed: SqliteInt = 0


def _version_detail(row: dict) -> dict:
    return {"version": row["version"], "sha256": row["sha256"], "rows": row["rows"],
            "pii": {k: n for k, n in row["pii"]["counts"].items() if n}}


def _register(request: Request, actor: Actor, name: str, fmt: str | None, sha256: str | None) -> Register:
    store = store_of(request)
    return lambda db, path, source: dataset_registry.register(db, store, name, path, source=source,
                                                              created_by=actor.key_id, fmt=fmt, sha256=sha256)


async def _file_response(request: Request, obj: StoredObject, fmt: str, filename: str) -> File:
    store = store_of(request)
    target = cache_dir(request, "datasets") / f"{obj.sha256}{dataset_registry.EXTENSIONS[fmt]}"
    if not target.exists():
        await asyncio.to_thread(store.get_file, obj, target)
    return File(target, filename=filename, media_type=MEDIA_TYPES[fmt])


class DatasetController(Controller):
    path = "/datasets"
    tags = ["datasets"]

    @get()
    async def list_datasets(self, request: Request, actor: Actor) -> Response:
        return await run(request, actor, dataset_registry.list_datasets)

    @get("/{name:str}")
    async def dataset_versions(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: {"name": name, "versions": dataset_registry.versions(db, name)})

    @post("/{name:str}/versions", opt=request_body(RegisterDataset))
    async def register_dataset(self, request: Request, actor: Actor, name: str) -> Response:
        body = await decoded(request)
        work = from_path_or_upload(request, actor, body, "datasets", _register(request, actor, name, body.format, body.sha256))
        return await run(request, actor, work, action="dataset.register", target=f"dataset/{name}",
                         detail=_version_detail, status=201)

    @post("/{name:str}/upload", request_max_body_size=None, opt=request_body(bytes))
    async def upload_dataset(self, request: Request, actor: Actor, name: str, filename: str,
                             format: Format | None = None, sha256: str | None = None) -> Response:
        """The dataset file as the request body (e.g. curl -T data.jsonl)."""
        register = _register(request, actor, check_name(name, "dataset"), format, sha256)
        work = await from_body(request, filename, register)
        return await run(request, actor, work, action="dataset.register", target=f"dataset/{name}",
                         detail=_version_detail, status=201)

    @get("/{name:str}/versions/{version:int}")
    async def get_dataset_version(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> Response:
        return await run(request, actor, lambda db: dataset_registry.get_version(db, name, version))

    @get("/{name:str}/diff")
    async def diff_versions(self, request: Request, actor: Actor, name: str, a: VersionNumber, b: VersionNumber,
                            key: str | None = None) -> Response:
        store, cache = store_of(request), cache_dir(request, "datasets")
        return await run(request, actor, lambda db: dataset_registry.diff(db, store, name, a, b, key=key, cache=cache))

    @post("/{name:str}/versions/{version:int}/mask")
    async def mask_version(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> Response:
        """Register a masked copy (every PII match replaced by a placeholder) as a new version."""
        store, cache = store_of(request), cache_dir(request, "datasets")
        return await run(request, actor,
                         lambda db: dataset_registry.mask(db, store, name, version, created_by=actor.key_id, cache=cache),
                         action="dataset.mask", target=f"dataset/{name}/{version}", detail=_version_detail, status=201)

    @post("/{name:str}/versions/{version:int}/split", opt=request_body(SplitRequest))
    async def split_version(self, request: Request, actor: Actor, name: str,
                            version: VersionNumber) -> Response:
        body = await decoded(request, required=False)
        store, cache = store_of(request), cache_dir(request, "datasets")

        def work(db):
            return dataset_registry.split(db, store, name, version, ratios=body.ratios, seed=body.seed,
                                          created_by=actor.key_id, cache=cache)

        return await run(request, actor, work, action="dataset.split", target=f"dataset/{name}/{version}",
                         detail=lambda s: {"split": s["id"], "seed": s["seed"],
                                           "rows": {p: v["rows"] for p, v in s["parts"].items()}}, status=201)

    @get("/{name:str}/versions/{version:int}/file")
    async def download_version(self, request: Request, actor: Actor, name: str, version: VersionNumber) -> File:
        row = await perform(request, actor, lambda db: dataset_registry.get_version(db, name, version))
        obj = StoredObject(dataset_registry.BUCKET, f"sha256/{row['sha256']}", row["sha256"], row["size"])
        extension = dataset_registry.EXTENSIONS[row["format"]]
        return await _file_response(request, obj, row["format"], f"{name}-v{version}{extension}")

    @get("/{name:str}/versions/{version:int}/splits/{split_id:str}/{part:str}")
    async def download_part(self, request: Request, actor: Actor, name: str, version: VersionNumber,
                            split_id: str, part: str) -> File:
        obj, fmt = await perform(request, actor, lambda db: dataset_registry.part_object(db, name, version, split_id, part))
        return await _file_response(request, obj, fmt, f"{name}-v{version}-{part}{dataset_registry.EXTENSIONS[fmt]}")

    @delete("/{name:str}/versions/{version:int}", status_code=200)
    async def delete_dataset_version(self, request: Request, actor: Actor, name: str,
                                     version: VersionNumber) -> Response:
        store = store_of(request)
        return await run(request, actor, lambda db: dataset_registry.delete_version(db, store, name, version),
                         action="dataset.delete", target=f"dataset/{name}/{version}")
