"""The object store: models, datasets, checkpoints and backups in S3 buckets, through the
`minio` SDK, whether the server is the appliance's own MinIO or any S3-compatible one.

Objects are content-addressed: an object's key is `sha256/<hex digest>`, so a file stored
twice is stored once, and a key names exactly one content. The database holds metadata only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import urllib3
from minio import Minio
from minio.error import S3Error

from appliance.errors import ChecksumMismatch, NotFound, StorageUnavailable

BUCKETS = ("models", "datasets", "checkpoints", "backups")
CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 120.0
PRESIGN_EXPIRY = timedelta(hours=1)


class ObjectStoreSettings(msgspec.Struct, kw_only=True):
    """How to reach the store; resolved from the profile (and the managed MinIO's credentials)."""

    endpoint: str  # http(s)://host:port
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    bucket_prefix: str = ""
    part_size_mib: int = 64


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


class ObjectStore:
    def __init__(self, settings: ObjectStoreSettings):
        self.settings = settings
        url = urlsplit(settings.endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise StorageUnavailable(f"object store endpoint {settings.endpoint!r} is not an http(s) URL")
        self.client = Minio(
            url.netloc,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=url.scheme == "https",
            region=settings.region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
                retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
            ),
        )
        self.part_size = settings.part_size_mib * 1024 * 1024

    def bucket(self, name: str) -> str:
        if name not in BUCKETS:
            raise ValueError(f"unknown bucket {name!r}")
        return self.settings.bucket_prefix + name

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """S3 and network failures become appliance errors that say what was being done."""
        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise NotFound(f"{doing}: {exc.code} ({exc.bucket_name}/{exc.object_name or ''})") from None
            raise StorageUnavailable(f"{doing}: the object store at {self.settings.endpoint} said {exc.code}: {exc.message}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageUnavailable(
                f"{doing}: the object store at {self.settings.endpoint} is unreachable ({type(exc).__name__}: {exc})"
            ) from None

    def ensure_buckets(self) -> None:
        with self._errors("creating the buckets"):
            for name in BUCKETS:
                if not self.client.bucket_exists(self.bucket(name)):
                    self.client.make_bucket(self.bucket(name))

    def exists(self, bucket: str, key: str) -> int | None:
        """The object's size, or None when it is absent."""
        try:
            with self._errors(f"looking up {bucket}/{key}"):
                return self.client.stat_object(self.bucket(bucket), key).size
        except NotFound:
            return None

    def put_file(self, bucket: str, path: Path, *, sha256: str | None = None) -> StoredObject:
        """Store a local file under its content key (multipart above the part size).

        With `sha256` given, the file must have that digest: a mismatch stores nothing.
        """
        digest, size = sha256_file(path)
        if sha256 is not None and sha256.lower() != digest:
            raise ChecksumMismatch(f"{path.name}: SHA-256 is {digest}, expected {sha256.lower()}", param="sha256")
        key = content_key(digest)
        if self.exists(bucket, key) != size:
            with self._errors(f"storing {path.name} in {bucket}"):
                self.client.fput_object(self.bucket(bucket), key, str(path), part_size=self.part_size,
                                        metadata={"sha256": digest})
        return StoredObject(bucket, key, digest, size)

    def get_file(self, obj: StoredObject, dest: Path) -> Path:
        """Download to dest (atomically), checking the content against its SHA-256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            with self._errors(f"fetching {obj.bucket}/{obj.key}"):
                self.client.fget_object(self.bucket(obj.bucket), obj.key, tmp)
            digest, _ = sha256_file(Path(tmp))
            if digest != obj.sha256:
                raise ChecksumMismatch(f"{obj.bucket}/{obj.key}: the stored object's SHA-256 is {digest}, expected {obj.sha256}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def delete(self, bucket: str, key: str) -> None:
        with self._errors(f"deleting {bucket}/{key}"):
            self.client.remove_object(self.bucket(bucket), key)

    def presigned_upload(self, bucket: str) -> tuple[str, str]:
        """A staging key and a URL that accepts one PUT of its content for an hour."""
        key = f"uploads/{uuid.uuid4().hex}"
        with self._errors("signing an upload URL"):
            return key, self.client.presigned_put_object(self.bucket(bucket), key, expires=PRESIGN_EXPIRY)

    def fetch_upload(self, bucket: str, key: str, dest: Path) -> Path:
        """Download a staged upload to dest; the caller verifies and stores it by content."""
        if not key.startswith("uploads/"):
            raise NotFound(f"{key!r} is not an upload key (uploads/...)", param="upload_key")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(f"fetching the upload {key}"):
            self.client.fget_object(self.bucket(bucket), key, str(dest))
        return dest
