"""Files coming into the registries: streamed request bodies, presigned uploads
(POST /admin/uploads), and the staging folders they pass through."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, post
from litestar.exceptions import ClientException, InternalServerException

from appliance import home, permissions
from appliance.audit import Actor
from appliance.errors import InvalidRequest
from services.gateway.admin import decoded, gateway_of, request_body, run, store_of

# register(db, local path, source) -> the new version's row
Register = Callable[[Any, Path, str], dict]


class UploadRequest(msgspec.Struct, forbid_unknown_fields=True):
    bucket: Literal["models", "datasets"]


class UploadController(Controller):
    path = "/uploads"
    tags = ["uploads"]

    @post(opt=request_body(UploadRequest))
    async def create_upload(self, request: Request, actor: Actor) -> Response:
        """A presigned URL for one large file: PUT it there, then register it with its upload_key."""
        body = await decoded(request)
        store = store_of(request)

        def work(db):
            key, url = store.presigned_upload(body.bucket)
            return {"bucket": body.bucket, "upload_key": key, "url": url, "method": "PUT",
                    "headers": {"Content-Type": "application/octet-stream"}, "expires_in_s": 3600}

        return await run(request, actor, work, action="upload.create", target=f"{body.bucket}/uploads",
                         detail=lambda r: {"upload_key": r["upload_key"]}, status=201)


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
    name = os.path.basename(filename or "")
    if name in ("", ".", ".."):  # no name of its own: it would be the folder itself, or its parent
        name = default
    if "\x00" in name:  # no file system takes it
        raise InvalidRequest(f"{name!r} is not a file name: it holds a NUL character", param="filename")
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder, prefix="upload-")) / name


def discard(path: Path) -> None:
    shutil.rmtree(path.parent, ignore_errors=True)


def from_path_or_upload(request: Request, actor: Actor, body, bucket: str, register: Register) -> Callable[[Any], dict]:
    """The work of POST .../versions: register `body.path` (a path on the gateway's machine: an
    operator's or admin's call) or the file staged at `body.upload_key` by a presigned PUT,
    which is removed afterwards."""
    if (body.path is None) == (body.upload_key is None):
        raise InvalidRequest("give exactly one of 'path' (on the gateway's machine) or 'upload_key'", param="path")
    if body.path is not None:
        permissions.require(actor.role, "files.server", param="path")
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
    return home.tmp_dir(Path(gateway_of(request).runtime.home))


def cache_dir(request: Request, kind: str) -> Path:
    """Local copies of stored files (checked against their SHA-256 when fetched)."""
    path = home.cache_dir(Path(gateway_of(request).runtime.home), kind)
    path.mkdir(parents=True, exist_ok=True)
    return path
