"""The object store's interface, on both backends: the filesystem store (real files) and the
S3 backend against the real S3 server process (moto). Then what only the filesystem store
has to prove itself: writes that a crash cannot half-do, and reads that refuse corrupt bytes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from appliance.errors import ChecksumMismatch, InvalidRequest, NotFound, StorageUnavailable
from appliance.objectstore import FilesystemSettings, ObjectStoreSettings, S3Settings, StoredObject
from services.gateway.runtime import GatewayRuntime, decode_runtime


def data_file(path: Path, size: int = 300_000, seed: bytes = b"x") -> Path:
    """`size` bytes that differ with `seed`."""
    block = hashlib.sha256(seed).digest()
    path.write_bytes((block * (size // len(block) + 1))[:size])
    return path


@pytest.fixture(params=["filesystem", "s3"])
def settings(request, tmp_path) -> ObjectStoreSettings:
    if request.param == "s3":
        return request.getfixturevalue("object_store_settings")  # a bucket prefix of its own, buckets made
    settings = FilesystemSettings(path=str(tmp_path / "blobs"))
    settings.open().ensure_buckets()
    return settings


def test_put_get_list_and_delete(settings, tmp_path):
    store = settings.open()
    source = data_file(tmp_path / "weights.bin")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    stored = store.put_file("models", source, sha256=digest.upper())  # a digest is matched in any case
    assert stored == StoredObject("models", f"sha256/{digest}", digest, 300_000)
    assert store.exists("models", stored.key) == 300_000 and store.exists("datasets", stored.key) is None
    assert list(store.list_objects("models")) == [stored] and list(store.list_objects("datasets")) == []
    copy = store.get_file(stored, tmp_path / "out" / "copy.bin")
    assert copy.read_bytes() == source.read_bytes() and os.listdir(copy.parent) == ["copy.bin"]
    store.delete("models", stored.key)
    store.delete("models", stored.key)  # absent: nothing to do
    assert store.exists("models", stored.key) is None and list(store.list_objects("models")) == []
    with pytest.raises(NotFound):
        store.get_file(stored, tmp_path / "gone.bin")
    assert not (tmp_path / "gone.bin").exists()


def test_the_same_content_twice_is_one_object(settings, tmp_path):
    store = settings.open()
    first = store.put_file("datasets", data_file(tmp_path / "a.csv", 1000))
    second = store.put_file("datasets", data_file(tmp_path / "b.csv", 1000))
    assert first == second and len(list(store.list_objects("datasets"))) == 1


def test_a_wrong_digest_stores_nothing(settings, tmp_path):
    store = settings.open()
    with pytest.raises(ChecksumMismatch) as error:
        store.put_file("models", data_file(tmp_path / "m.gguf"), sha256="0" * 64)
    assert error.value.param == "sha256" and "expected 000" in error.value.message
    assert list(store.list_objects("models")) == []


def test_an_unknown_bucket_is_refused(settings, tmp_path):
    with pytest.raises(ValueError, match="unknown bucket 'weights'"):
        settings.open().put_file("weights", data_file(tmp_path / "m.bin"))


def test_settings_travel_in_the_runtime_file_with_their_kind(settings, tmp_path):
    runtime = msgspec.json.decode(b'{"home": "/h", "profile": "p", "gateway": {}, "models": []}', type=GatewayRuntime)
    encoded = msgspec.json.encode(msgspec.structs.replace(runtime, storage=settings))
    assert msgspec.json.decode(encoded)["storage"]["kind"] == ("s3" if isinstance(settings, S3Settings) else "filesystem")
    assert msgspec.json.decode(encoded, type=GatewayRuntime).storage == settings


def test_a_runtime_file_from_before_the_filesystem_store_names_s3():
    """gateway.json rendered by an older install has no "kind": a re-install keeps its S3 keys."""
    old = (b'{"home": "/h", "profile": "p", "gateway": {}, "models": [], "storage": {"endpoint": "http://127.0.0.1:9000",'
           b' "access_key": "ak", "secret_key": "sk"}}')
    storage = decode_runtime(old).storage
    assert isinstance(storage, S3Settings) and (storage.endpoint, storage.access_key) == ("http://127.0.0.1:9000", "ak")


# --- the filesystem store ---------------------------------------------------------------

CRASHING_PUT = """
import resource, signal, sys
from pathlib import Path
from appliance.objectstore import FilesystemSettings
store = FilesystemSettings(path=sys.argv[1]).open()
# Die as the kernel kills a process that writes past its file size limit: mid-write, no cleanup.
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
store.put_file("models", Path(sys.argv[2]))
"""


def test_a_crash_mid_write_leaves_no_visible_object(tmp_path):
    settings = FilesystemSettings(path=str(tmp_path / "blobs"))
    source = data_file(tmp_path / "big.gguf", 1_000_000)
    crashed = subprocess.run([sys.executable, "-c", CRASHING_PUT, settings.path, str(source)],
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, timeout=60)
    assert crashed.returncode == -signal.SIGXFSZ, crashed.stderr.decode()
    folder = tmp_path / "blobs" / "models" / "sha256"
    [partial] = folder.iterdir()  # the half-written file is there, hidden
    assert partial.name.startswith(".") and partial.name.endswith(".partial") and partial.stat().st_size == 65536

    store = settings.open()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert store.exists("models", f"sha256/{digest}") is None and list(store.list_objects("models")) == []
    with pytest.raises(NotFound):
        store.get_file(StoredObject("models", f"sha256/{digest}", digest, 1_000_000), tmp_path / "out.gguf")
    stored = store.put_file("models", source)  # storing it again works
    assert store.get_file(stored, tmp_path / "out.gguf").read_bytes() == source.read_bytes()

    store.ensure_buckets()
    assert partial.exists()  # a fresh one may belong to a write still going on
    os.utime(partial, (0, 0))
    store.ensure_buckets()
    assert sorted(p.name for p in folder.iterdir()) == [digest]


def test_a_corrupted_object_is_refused_on_read(tmp_path):
    store = FilesystemSettings(path=str(tmp_path / "blobs")).open()
    stored = store.put_file("datasets", data_file(tmp_path / "rows.csv", 5000))
    on_disk = tmp_path / "blobs" / "datasets" / stored.key
    with open(on_disk, "r+b") as f:
        f.seek(1234)
        f.write(b"\x00")
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatch, match=f"datasets/{stored.key} in .*: the stored object's SHA-256 is"):
        store.get_file(stored, out / "rows.csv")
    assert os.listdir(out) == []  # neither the file nor a partial download


def test_the_same_content_is_written_once(tmp_path):
    store = FilesystemSettings(path=str(tmp_path / "blobs")).open()
    stored = store.put_file("models", data_file(tmp_path / "a.gguf"))
    on_disk = tmp_path / "blobs" / "models" / stored.key
    before = on_disk.stat()
    assert store.put_file("models", data_file(tmp_path / "b.gguf")) == stored
    after = on_disk.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert os.listdir(on_disk.parent) == [on_disk.name]


def test_a_store_that_cannot_write_says_where(tmp_path):
    (tmp_path / "a-file").write_text("")
    store = FilesystemSettings(path=str(tmp_path / "a-file" / "blobs")).open()
    with pytest.raises(StorageUnavailable, match=r"creating the buckets: the object store folder .*a-file/blobs failed"):
        store.ensure_buckets()
    with pytest.raises(StorageUnavailable, match="looking up models/sha256/.*: the object store folder .* failed"):
        store.put_file("models", data_file(tmp_path / "m.gguf"))


def test_minio_data_and_presigned_uploads_are_refused_clearly(tmp_path):
    (tmp_path / "objects" / ".minio.sys").mkdir(parents=True)
    with pytest.raises(StorageUnavailable, match="is MinIO's data folder"):
        FilesystemSettings(path=str(tmp_path / "objects")).open().ensure_buckets()
    store = FilesystemSettings(path=str(tmp_path / "blobs")).open()
    with pytest.raises(InvalidRequest, match="no presigned upload URLs: upload through the gateway") as error:
        store.presigned_upload("models")
    assert error.value.code == "presigned_upload_unsupported"
