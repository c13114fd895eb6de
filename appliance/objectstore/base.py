"""What every object store does, whatever keeps the bytes.

Objects are content-addressed: an object's key is `sha256/<hex digest>`, so a file stored
twice is stored once, and a key names exactly one content. Storing checks the digest
before anything is visible; fetching checks it again before the file is handed over.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from appliance.errors import ChecksumMismatch

BUCKETS = ("models", "datasets", "checkpoints", "backups")
CHUNK = 1 << 20
CONTENT_KEY = re.compile(r"sha256/([0-9a-f]{64})")


class StoredObject(msgspec.Struct, frozen=True):
    bucket: str  # the logical bucket: models, datasets, checkpoints or backups
    key: str
    sha256: str
    size: int


def content_key(sha256: str) -> str:
    return f"sha256/{sha256}"


def sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_bucket(name: str) -> str:
    if name not in BUCKETS:
        raise ValueError(f"unknown bucket {name!r} (one of {', '.join(BUCKETS)})")
    return name


class ObjectStore(ABC):
    """The interface of the registries, the worker, the deployment controller and the gateway.

    A backend provides the primitives (abstract below); checking content against its
    SHA-256 on the way in and out is done here, once, for all of them.
    """

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the objects are, for messages: a folder or an endpoint."""

    @abstractmethod
    def ensure_buckets(self) -> None: ...

    @abstractmethod
    def exists(self, bucket: str, key: str) -> int | None:
        """The object's size, or None when it is absent."""

    @abstractmethod
    def list_objects(self, bucket: str) -> Iterator[StoredObject]:
        """Every content-addressed object (`sha256/...`) of the bucket; none when the bucket is missing."""

    @abstractmethod
    def delete(self, bucket: str, key: str) -> None:
        """Remove the object; an absent one is not an error."""

    @abstractmethod
    def presigned_upload(self, bucket: str) -> tuple[str, str]:
        """A staging key (`uploads/...`) and a URL that accepts one PUT of its content for an hour."""

    @abstractmethod
    def fetch_upload(self, bucket: str, key: str, dest: Path) -> Path:
        """Download a staged upload to dest; the caller verifies and stores it by content."""

    @abstractmethod
    def _store(self, bucket: str, key: str, path: Path, sha256: str) -> None:
        """Make the file at `path` (whose digest is `sha256`) the object `key`, all or nothing."""

    @abstractmethod
    def _fetch(self, obj: StoredObject, dest: Path) -> None:
        """Copy the object's bytes to `dest`, unchecked."""

    def put_file(self, bucket: str, path: Path, *, sha256: str | None = None) -> StoredObject:
        """Store a local file under its content key; content already stored is not stored again.

        With `sha256` given, the file must have that digest: a mismatch stores nothing.
        """
        digest, size = sha256_file(path)
        if sha256 is not None and sha256.lower() != digest:
            raise ChecksumMismatch(f"{path.name}: SHA-256 is {digest}, expected {sha256.lower()}", param="sha256")
        key = content_key(digest)
        if self.exists(check_bucket(bucket), key) != size:
            self._store(bucket, key, path, digest)
        return StoredObject(bucket, key, digest, size)

    def get_file(self, obj: StoredObject, dest: Path) -> Path:
        """Download to dest (atomically), checking the content against its SHA-256."""
        check_bucket(obj.bucket)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            self._fetch(obj, Path(tmp))
            digest, _ = sha256_file(Path(tmp))
            if digest != obj.sha256:
                raise ChecksumMismatch(f"{obj.bucket}/{obj.key} in {self.location}: the stored object's SHA-256 is "
                                       f"{digest}, expected {obj.sha256}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    @contextmanager
    def local_file(self, obj: StoredObject, work: Path) -> Iterator[Path]:
        """The object as a local file while the block runs, to read only: here a checked download into
        `work`; a backend that keeps files locally hands over its own, unchecked, so check as you read."""
        path = self.get_file(obj, work / obj.sha256)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
