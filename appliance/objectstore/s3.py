"""The S3 backend: the appliance's own MinIO or any S3-compatible server, through the `minio` SDK."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from appliance.errors import NotFound, StorageUnavailable
from appliance.objectstore.base import BUCKETS, CONTENT_KEY, ObjectStore, StoredObject, check_bucket

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 120.0
PRESIGN_EXPIRY = timedelta(hours=1)


class S3Settings(msgspec.Struct, kw_only=True, tag_field="kind", tag="s3"):
    """How to reach the server; resolved from the profile (and the managed MinIO's credentials)."""

    endpoint: str  # http(s)://host:port
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    bucket_prefix: str = ""
    part_size_mib: int = 64

    @property
    def label(self) -> str:
        return f"S3 at {self.endpoint}" + (f" (buckets {self.bucket_prefix}*)" if self.bucket_prefix else "")

    def open(self) -> S3Store:
        return S3Store(self)


class S3Store(ObjectStore):
    def __init__(self, settings: S3Settings):
        self.settings = settings
        url = urlsplit(settings.endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise StorageUnavailable(f"object store endpoint {settings.endpoint!r} is not an http(s) URL")
        # The SDK is imported by the store that uses it: it takes longer to load than most CLI commands run.
        import urllib3
        from minio import Minio

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

    @property
    def location(self) -> str:
        return self.settings.endpoint

    def bucket(self, name: str) -> str:
        return self.settings.bucket_prefix + check_bucket(name)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """S3 and network failures become appliance errors that say what was being done."""
        import urllib3
        from minio.error import S3Error

        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise NotFound(f"{doing}: {exc.code} ({exc.bucket_name}/{exc.object_name or ''})") from None
            raise StorageUnavailable(f"{doing}: the object store at {self.location} said {exc.code}: {exc.message}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageUnavailable(
                f"{doing}: the object store at {self.location} is unreachable ({type(exc).__name__}: {exc})"
            ) from None

    def ensure_buckets(self) -> None:
        with self._errors("creating the buckets"):
            for name in map(self.bucket, BUCKETS):
                if not self.client.bucket_exists(name):
                    self.client.make_bucket(name)

    def exists(self, bucket: str, key: str) -> int | None:
        try:
            with self._errors(f"looking up {bucket}/{key}"):
                return self.client.stat_object(self.bucket(bucket), key).size
        except NotFound:
            return None

    def list_objects(self, bucket: str) -> Iterator[StoredObject]:
        try:
            with self._errors(f"listing {bucket}"):
                for item in self.client.list_objects(self.bucket(bucket), prefix="sha256/", recursive=True):
                    if match := CONTENT_KEY.fullmatch(item.object_name):
                        yield StoredObject(bucket, item.object_name, match[1], item.size)
        except NotFound:
            return

    def delete(self, bucket: str, key: str) -> None:
        with self._errors(f"deleting {bucket}/{key}"):
            self.client.remove_object(self.bucket(bucket), key)

    def presigned_upload(self, bucket: str) -> tuple[str, str]:
        key = f"uploads/{uuid.uuid4().hex}"
        with self._errors("signing an upload URL"):
            return key, self.client.presigned_put_object(self.bucket(bucket), key, expires=PRESIGN_EXPIRY)

    def fetch_upload(self, bucket: str, key: str, dest: Path) -> Path:
        if not key.startswith("uploads/"):
            raise NotFound(f"{key!r} is not an upload key (uploads/...)", param="upload_key")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(f"fetching the upload {key}"):
            self.client.fget_object(self.bucket(bucket), key, str(dest))
        return dest

    def _store(self, bucket: str, key: str, path: Path, sha256: str) -> None:
        with self._errors(f"storing {path.name} in {bucket}"):
            self.client.fput_object(self.bucket(bucket), key, str(path), part_size=self.part_size,
                                    metadata={"sha256": sha256})

    def _fetch(self, obj: StoredObject, dest: Path) -> None:
        with self._errors(f"fetching {obj.bucket}/{obj.key}"):
            self.client.fget_object(self.bucket(obj.bucket), obj.key, str(dest))
