"""Which object store the appliance uses, and the MinIO server it runs itself.

`storage.object_store` in the profile: `filesystem` keeps the objects in a folder
(`storage.data_path`, default <home>/blobs) with no server to run; `minio` runs MinIO (its
binary must be installed: the bundle puts it next to the appliance's Python); `s3` uses an
existing S3-compatible endpoint with credentials from the environment; `none` turns the
registries off; `auto` (the default) means `minio` when the binary is there, else
`filesystem`. The managed server's root credentials are generated once, into
$APPLIANCE_HOME/minio.env with mode 0600.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from appliance.config import Profile, StorageConfig
from appliance.errors import ProfileError
from appliance.files import write_new
from appliance.home import blobs_dir, minio_data_dir
from appliance.objectstore import FilesystemSettings, ObjectStoreSettings, S3Settings

DEFAULT_MINIO_ENDPOINT = "http://127.0.0.1:9000"
CREDENTIALS_FILE = "minio.env"
ROOT_USER = "appliance"


class ManagedMinio(msgspec.Struct, frozen=True):
    """A MinIO server for `appliance up` to start: its command, environment and health check."""

    argv: list[str]
    env: dict[str, str]
    health_url: str


def minio_binary(search_path: str | None = None) -> Path | None:
    """MinIO's server beside this Python (where the bundle puts it), else on `search_path` (default $PATH)."""
    beside = Path(sys.executable).parent / "minio"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("minio", path=search_path)
    return Path(found) if found else None


def read_credentials(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def ensure_credentials(home: Path) -> dict[str, str]:
    """MINIO_ROOT_USER and MINIO_ROOT_PASSWORD: generated on first use, then read back."""
    path = home / CREDENTIALS_FILE
    existing = read_credentials(path)
    if existing.get("MINIO_ROOT_USER") and existing.get("MINIO_ROOT_PASSWORD"):
        return existing
    credentials = {"MINIO_ROOT_USER": ROOT_USER, "MINIO_ROOT_PASSWORD": secrets.token_hex(24)}
    home.mkdir(parents=True, exist_ok=True)
    lines = ["# MinIO root credentials, generated on first start.\n", *(f"{k}={v}\n" for k, v in credentials.items())]
    write_new(path, "".join(lines).encode())
    return credentials


def server_argv(binary: Path, endpoint: str, data: Path) -> list[str]:
    """`minio server` listening on the endpoint's host:port, its console on the next port."""
    address = urlsplit(endpoint).netloc
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ProfileError(f"storage.endpoint: MinIO needs host:port to listen on, got {endpoint!r}")
    return [str(binary), "server", str(data), "--address", address, "--console-address", f"{host}:{int(port) + 1}", "--quiet"]


def store_kind(storage: StorageConfig, minio_installed: bool) -> str:
    """`storage.object_store` made concrete: `auto` is `minio` where its binary is installed, else `filesystem`."""
    if storage.object_store == "auto":
        return "minio" if minio_installed else "filesystem"
    return storage.object_store


def filesystem_settings(storage: StorageConfig, home: Path) -> FilesystemSettings:
    return FilesystemSettings(path=str(Path(storage.data_path) if storage.data_path else blobs_dir(home)))


def store_settings(storage: StorageConfig, endpoint: str, access_key: str, secret_key: str) -> S3Settings:
    return S3Settings(endpoint=endpoint, access_key=access_key, secret_key=secret_key, region=storage.region,
                      bucket_prefix=storage.bucket_prefix, part_size_mib=storage.part_size_mib)


def resolve_object_store(profile: Profile, home: Path, env: dict[str, str] | None = None, *, as_client: bool = False
                         ) -> tuple[ObjectStoreSettings | None, ManagedMinio | None]:
    """The object store to use and, when the appliance runs it, the MinIO server to start.

    as_client: the store as a command beside the appliance sees it; the managed MinIO's
    credentials are read from the home, never made, and no server is described.
    """
    storage = profile.storage
    env = os.environ if env is None else env
    binary = minio_binary(env.get("PATH", "")) if storage.object_store in ("auto", "minio") else None
    kind = store_kind(storage, binary is not None)
    if kind == "none":
        return None, None
    if kind == "filesystem":
        return filesystem_settings(storage, home), None
    if kind == "s3":
        missing = [name for name in (storage.access_key_env, storage.secret_key_env) if not env.get(name)]
        if missing:
            raise ProfileError(f"storage: object_store 's3' needs the credentials in {' and '.join(missing)} (not set)")
        return store_settings(storage, storage.endpoint, env[storage.access_key_env], env[storage.secret_key_env]), None
    if binary is None:
        raise ProfileError("storage.object_store is 'minio' but the MinIO binary is not installed "
                           f"(looked beside {sys.executable} and on PATH)")
    endpoint = storage.endpoint or DEFAULT_MINIO_ENDPOINT
    if as_client:
        credentials = read_credentials(home / CREDENTIALS_FILE)
        if not (credentials.get("MINIO_ROOT_USER") and credentials.get("MINIO_ROOT_PASSWORD")):
            raise ProfileError(f"the profile's object store is the managed MinIO, which has not run in {home} "
                               f"yet (no credentials in {home / CREDENTIALS_FILE})")
        return store_settings(storage, endpoint, credentials["MINIO_ROOT_USER"], credentials["MINIO_ROOT_PASSWORD"]), None
    credentials = ensure_credentials(home)
    data = Path(storage.data_path) if storage.data_path else minio_data_dir(home)
    server = ManagedMinio(
        argv=server_argv(binary, endpoint, data),
        env={**{k: v for k, v in env.items() if not k.startswith("MINIO_")}, **credentials},
        health_url=f"{endpoint}/minio/health/live",
    )
    return store_settings(storage, endpoint, credentials["MINIO_ROOT_USER"], credentials["MINIO_ROOT_PASSWORD"]), server
