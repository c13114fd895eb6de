"""The dataset registry's part of the admin API: /admin/datasets."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.response import File

from appliance import dataset_registry
from appliance.audit import Actor
from appliance.model_registry import check_name
from appliance.objectstore import StoredObject
from services.gateway import schemas
from services.gateway.admin import (
    Register,
    authorize,
    cache_dir,
    from_body,
    from_path_or_upload,
    perform,
    run,
    store_of,
)

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
    seed: int = 0


def _version_detail(row: dict) -> dict:
    return {"version": row["version"], "sha256": row["sha256"], "rows": row["rows"],
            "pii": {k: n for k, n in row["pii"]["counts"].items() if n}}


@get("/admin/datasets")
async def list_datasets(request: Request) -> Response:
    return await run(request, authorize(request), dataset_registry.list_datasets)


@get("/admin/datasets/{name:str}")
async def dataset_versions(request: Request, name: str) -> Response:
    return await run(request, authorize(request), lambda db: {"name": name, "versions": dataset_registry.versions(db, name)})


@post("/admin/datasets/{name:str}/versions")
async def register_dataset(request: Request, name: str) -> Response:
    actor = authorize(request)
    body = schemas.decode(await request.body(), RegisterDataset)
    work = from_path_or_upload(request, body, "datasets", _dataset_register(request, actor, name, body.format, body.sha256))
    return await run(request, actor, work, action="dataset.register", target=f"dataset/{name}",
                     detail=_version_detail, status=201)


@post("/admin/datasets/{name:str}/upload", request_max_body_size=None)
async def upload_dataset(request: Request, name: str, filename: str, format: Format | None = None,
                         sha256: str | None = None) -> Response:
    """The dataset file as the request body (e.g. curl -T data.jsonl)."""
    actor = authorize(request)
    register = _dataset_register(request, actor, check_name(name, "dataset"), format, sha256)
    work = await from_body(request, filename, register)
    return await run(request, actor, work, action="dataset.register", target=f"dataset/{name}",
                     detail=_version_detail, status=201)


def _dataset_register(request: Request, actor: Actor, name: str, fmt: str | None, sha256: str | None) -> Register:
    store = store_of(request)
    return lambda db, path, source: dataset_registry.register(db, store, name, path, source=source,
                                                              created_by=actor.key_id, fmt=fmt, sha256=sha256)


@get("/admin/datasets/{name:str}/versions/{version:int}")
async def get_dataset_version(request: Request, name: str, version: int) -> Response:
    return await run(request, authorize(request), lambda db: dataset_registry.get_version(db, name, version))


@get("/admin/datasets/{name:str}/diff")
async def diff_versions(request: Request, name: str, a: int, b: int, key: str | None = None) -> Response:
    actor = authorize(request)
    store, cache = store_of(request), cache_dir(request, "datasets")
    return await run(request, actor, lambda db: dataset_registry.diff(db, store, name, a, b, key=key, cache=cache))


@post("/admin/datasets/{name:str}/versions/{version:int}/mask")
async def mask_version(request: Request, name: str, version: int) -> Response:
    """Register a masked copy (every PII match replaced by a placeholder) as a new version."""
    actor = authorize(request)
    store, cache = store_of(request), cache_dir(request, "datasets")
    return await run(request, actor, lambda db: dataset_registry.mask(db, store, name, version, created_by=actor.key_id,
                                                                        cache=cache),
                     action="dataset.mask", target=f"dataset/{name}/{version}", detail=_version_detail, status=201)


@post("/admin/datasets/{name:str}/versions/{version:int}/split")
async def split_version(request: Request, name: str, version: int) -> Response:
    actor = authorize(request)
    raw = await request.body()
    body = schemas.decode(raw, SplitRequest) if raw.strip() else SplitRequest()
    store, cache = store_of(request), cache_dir(request, "datasets")

    def work(db):
        return dataset_registry.split(db, store, name, version, ratios=body.ratios, seed=body.seed,
                                      created_by=actor.key_id, cache=cache)

    return await run(request, actor, work, action="dataset.split", target=f"dataset/{name}/{version}",
                     detail=lambda s: {"split": s["id"], "seed": s["seed"],
                                       "rows": {p: v["rows"] for p, v in s["parts"].items()}}, status=201)


async def _file_response(request: Request, obj: StoredObject, fmt: str, filename: str) -> File:
    store = store_of(request)
    target = cache_dir(request, "datasets") / f"{obj.sha256}{dataset_registry.EXTENSIONS[fmt]}"
    if not target.exists():
        await asyncio.to_thread(store.get_file, obj, target)
    return File(target, filename=filename, media_type=MEDIA_TYPES[fmt])


@get("/admin/datasets/{name:str}/versions/{version:int}/file")
async def download_version(request: Request, name: str, version: int) -> File:
    actor = authorize(request)
    row = await perform(request, actor, lambda db: dataset_registry.get_version(db, name, version))
    obj = StoredObject(dataset_registry.BUCKET, f"sha256/{row['sha256']}", row["sha256"], row["size"])
    return await _file_response(request, obj, row["format"], f"{name}-v{version}{dataset_registry.EXTENSIONS[row['format']]}")


@get("/admin/datasets/{name:str}/versions/{version:int}/splits/{split_id:str}/{part:str}")
async def download_part(request: Request, name: str, version: int, split_id: str, part: str) -> File:
    actor = authorize(request)
    obj, fmt = await perform(request, actor, lambda db: dataset_registry.part_object(db, name, version, split_id, part))
    return await _file_response(request, obj, fmt, f"{name}-v{version}-{part}{dataset_registry.EXTENSIONS[fmt]}")


@delete("/admin/datasets/{name:str}/versions/{version:int}", status_code=200)
async def delete_dataset_version(request: Request, name: str, version: int) -> Response:
    actor = authorize(request)
    store = store_of(request)
    return await run(request, actor, lambda db: dataset_registry.delete_version(db, store, name, version),
                     action="dataset.delete", target=f"dataset/{name}/{version}")


DATASET_HANDLERS = [
    list_datasets, dataset_versions, register_dataset, upload_dataset, get_dataset_version, diff_versions, mask_version,
    split_version, download_version, download_part, delete_dataset_version,
]
