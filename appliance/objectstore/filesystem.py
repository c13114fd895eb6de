"""The filesystem backend: objects as files in one folder, with no server to run.

Layout: <folder>/<bucket>/sha256/<hex digest>. A write goes to a hidden temporary file
beside its final name, is flushed to disk (fsync), and is then renamed into place
(os.replace, atomic on POSIX) and the folder synced: whatever the moment of a crash, an
object is either whole or absent. Temporary files left by a crash are removed when the
buckets are ensured (at every start) once they are a day old.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from appliance.errors import ChecksumMismatch, InvalidRequest, NotFound, StorageUnavailable
from appliance.objectstore.base import BUCKETS, CHUNK, CONTENT_KEY, ObjectStore, StoredObject, check_bucket

PARTIAL_SUFFIX = ".partial"
STALE_PARTIAL_S = 24 * 3600


class FilesystemSettings(msgspec.Struct, kw_only=True, tag_field="kind", tag="filesystem"):
    path: str  # an absolute folder

    @property
    def label(self) -> str:
        return f"filesystem at {self.path}"

    def open(self) -> FilesystemStore:
        return FilesystemStore(self)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore(ObjectStore):
    def __init__(self, settings: FilesystemSettings):
        if not os.path.isabs(settings.path):
            raise StorageUnavailable(f"the filesystem object store needs an absolute folder, got {settings.path!r}")
        self.settings = settings
        self.root = Path(settings.path)

    @property
    def location(self) -> str:
        return str(self.root)

    def _path(self, bucket: str, key: str) -> Path | None:
        """The file of a content key; None for any other key (nothing else is stored here)."""
        check_bucket(bucket)
        return self.root / bucket / key if CONTENT_KEY.fullmatch(key) else None

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise NotFound(f"{doing}: no such object in {self.root}") from None
        except OSError as exc:
            raise StorageUnavailable(f"{doing}: the object store folder {self.root} failed: "
                                     f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}") from None

    def ensure_buckets(self) -> None:
        with self._errors("creating the buckets"):
            if (self.root / ".minio.sys").exists():
                raise StorageUnavailable(f"{self.root} is MinIO's data folder: give the filesystem object store a "
                                         "folder of its own (storage.data_path)")
            for bucket in BUCKETS:
                folder = self.root / bucket / "sha256"
                folder.mkdir(parents=True, exist_ok=True)
                self._remove_stale_partials(folder)

    @staticmethod
    def _remove_stale_partials(folder: Path) -> None:
        cutoff = time.time() - STALE_PARTIAL_S
        for partial in folder.glob(f".*{PARTIAL_SUFFIX}"):
            try:
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
            except FileNotFoundError:  # finished or removed meanwhile
                pass

    def exists(self, bucket: str, key: str) -> int | None:
        path = self._path(bucket, key)
        if path is None:
            return None
        try:
            with self._errors(f"looking up {bucket}/{key}"):
                return path.stat().st_size
        except NotFound:
            return None

    def list_objects(self, bucket: str) -> Iterator[StoredObject]:
        folder = self.root / check_bucket(bucket) / "sha256"
        try:
            with self._errors(f"listing {bucket}"):
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except NotFound:
            return
        for entry in entries:
            if CONTENT_KEY.fullmatch(key := f"sha256/{entry.name}") and entry.is_file():
                yield StoredObject(bucket, key, entry.name, entry.stat().st_size)

    def delete(self, bucket: str, key: str) -> None:
        path = self._path(bucket, key)
        if path is not None:
            with self._errors(f"deleting {bucket}/{key}"):
                path.unlink(missing_ok=True)

    def presigned_upload(self, bucket: str) -> tuple[str, str]:
        raise InvalidRequest("the filesystem object store has no presigned upload URLs: upload through the gateway "
                             "instead (without --presigned)", param="bucket", code="presigned_upload_unsupported")

    def fetch_upload(self, bucket: str, key: str, dest: Path) -> Path:
        raise NotFound(f"{key!r}: the filesystem object store has no staged uploads (it has no presigned URLs)",
                       param="upload_key")

    def _store(self, bucket: str, key: str, path: Path, sha256: str) -> None:
        final = self._path(bucket, key)
        with self._errors(f"storing {path.name} in {bucket}"):
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".", suffix=PARTIAL_SUFFIX)
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if digest.hexdigest() != sha256:
                    raise ChecksumMismatch(f"{path.name} changed while it was being stored (its SHA-256 went from "
                                           f"{sha256} to {digest.hexdigest()}); nothing was stored")
                os.replace(tmp, final)
                _fsync_folder(final.parent)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _fetch(self, obj: StoredObject, dest: Path) -> None:
        """A hard link where the folders share a file system (a model deployed from the store
        takes no second copy's space; nothing writes either name), else a copy."""
        source = self._path(obj.bucket, obj.key)
        if source is None:
            raise NotFound(f"{obj.key!r} is not a content key (sha256/<hex digest>)")
        with self._errors(f"fetching {obj.bucket}/{obj.key}"):
            dest.unlink(missing_ok=True)
            try:
                os.link(source, dest)
            except FileNotFoundError:
                raise
            except OSError:  # another file system, or links not allowed there
                shutil.copyfile(source, dest)

    @contextmanager
    def local_file(self, obj: StoredObject, work: Path) -> Iterator[Path]:
        """The stored file itself: nothing is copied (the caller checks it as it reads it)."""
        path = self._path(obj.bucket, obj.key)
        if path is None or self.exists(obj.bucket, obj.key) is None:
            raise NotFound(f"{obj.bucket}/{obj.key}: no such object in {self.root}")
        yield path
