"""`appliance objects copy|status|list` through the installed command, between the
filesystem store (real files) and the real S3 server process (moto), in both directions."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.objectstore import FilesystemSettings, ObjectStoreSettings
from tests.appliance.test_objectstore import data_file
from tests.conftest import appliance, free_port, s3_env
from tests.gateway.registry_stores import path_without_minio


def fill(settings: ObjectStoreSettings, tmp_path: Path) -> dict[tuple[str, str], bytes]:
    """Two model files and a dataset; (bucket, key) -> content."""
    store, stored = settings.open(), {}
    for bucket, name, size in [("models", "a.gguf", 700_000), ("models", "b.gguf", 1000), ("datasets", "c.csv", 50)]:
        path = data_file(tmp_path / name, size, seed=name.encode())
        stored[(bucket, store.put_file(bucket, path).key)] = path.read_bytes()
    return stored


def contents(settings: ObjectStoreSettings, tmp_path: Path) -> dict[tuple[str, str], bytes]:
    store = settings.open()
    return {(obj.bucket, obj.key): store.get_file(obj, tmp_path / "read" / obj.sha256).read_bytes()
            for bucket in ("models", "datasets", "checkpoints", "backups") for obj in store.list_objects(bucket)}


def s3_url(settings) -> str:
    return f"{settings.endpoint}?bucket_prefix={settings.bucket_prefix}"


def copy(source: str, target: str, env: dict, check: bool = True):
    return appliance("objects", "copy", "--from", source, "--to", target, "--json", env=env, check=check)


def test_copy_from_the_filesystem_store_to_s3_and_back(tmp_path, object_store_settings):
    s3, env = object_store_settings, s3_env(object_store_settings)
    original = FilesystemSettings(path=str(tmp_path / "blobs"))
    stored = fill(original, tmp_path)

    there = copy(f"file://{original.path}", s3_url(s3), env)
    report = json.loads(there.stdout)
    assert (report["copied"], report["copied_bytes"], report["present"], report["failed"]) == (3, 701_050, 0, [])
    assert there.stderr.count("copied ") == 3 and "copied models/sha256/" in there.stderr
    assert contents(s3, tmp_path) == stored
    again = json.loads(copy(f"file://{original.path}", s3_url(s3), env).stdout)
    assert (again["copied"], again["present"]) == (0, 3)  # already there: skipped

    back = FilesystemSettings(path=str(tmp_path / "moved"))
    report = json.loads(copy(s3_url(s3), f"file://{back.path}", env).stdout)
    assert (report["copied"], report["present"], report["failed"]) == (3, 0, [])
    assert contents(back, tmp_path) == stored
    text = appliance("objects", "copy", "--from", s3_url(s3), "--to", f"file://{back.path}", env=env).stdout
    assert text.startswith(f"0 copied (0 B), 3 already there, 0 failed: from S3 at {s3.endpoint}")


def test_a_corrupt_object_is_not_copied_and_the_copy_fails(tmp_path, object_store_settings):
    source = FilesystemSettings(path=str(tmp_path / "blobs"))
    stored = fill(source, tmp_path)
    bad_key = next(key for bucket, key in stored if bucket == "datasets")
    with open(Path(source.path, "datasets", bad_key), "r+b") as f:
        f.write(b"!")
    result = copy(f"file://{source.path}", s3_url(object_store_settings), s3_env(object_store_settings), check=False)
    assert result.returncode == 1
    assert f"1 object(s) were not copied:\n  datasets/{bad_key}: corrupt in the source, not copied" in result.stderr
    report = json.loads(result.stdout)
    assert (report["copied"], len(report["failed"])) == (2, 1)
    assert contents(object_store_settings, tmp_path) == {k: v for k, v in stored.items() if k[1] != bad_key}


def test_a_bad_target_is_a_clear_error(tmp_path, s3_server):
    source = FilesystemSettings(path=str(tmp_path / "blobs"))
    fill(source, tmp_path)
    env = s3_env(s3_server)
    dead = f"http://127.0.0.1:{free_port()}"
    result = copy(f"file://{source.path}", dead, env, check=False)
    assert result.returncode == 1 and f"creating the buckets: the object store at {dead} is unreachable" in result.stderr
    for target, env, error in [
        (s3_server.endpoint, {"APPLIANCE_S3_ACCESS_KEY": "", "APPLIANCE_S3_SECRET_KEY": ""},
         "an S3 store needs its keys in APPLIANCE_S3_ACCESS_KEY and APPLIANCE_S3_SECRET_KEY"),
        ("ftp://host/objects", env, "the scheme 'ftp' is not supported"),
        (f"{s3_server.endpoint}?bucket_prefix=Acme", env, "bucket_prefix is lowercase letters"),
        ("nonesuch", env, "unknown profile 'nonesuch'"),
        (f"file://{source.path}", env, "is also the store copied from"),
    ]:
        result = copy(f"file://{source.path}", target, env, check=False)
        assert result.returncode == 2 and "--to" in result.stderr and error in result.stderr, (target, result.stderr)


def test_status_and_list_of_the_profiles_store_in_the_home(tmp_path):
    home = tmp_path / "home"
    stored = fill(FilesystemSettings(path=str(home / "blobs")), tmp_path)
    env = {"PATH": path_without_minio(), "APPLIANCE_PROFILE": "edge-cpu"}  # auto, with no MinIO: the filesystem store
    status = json.loads(appliance("objects", "status", "--home", str(home), "--json", env=env).stdout)
    assert status["store"] == f"filesystem at {home / 'blobs'}"
    assert {b["bucket"]: (b["objects"], b["bytes"]) for b in status["buckets"]} == {
        "models": (2, 701_000), "datasets": (1, 50), "checkpoints": (0, 0), "backups": (0, 0)}
    listed = json.loads(appliance("objects", "list", "models", "--home", str(home), "--json", env=env).stdout)
    assert {(r["bucket"], r["key"]) for r in listed} == {k for k in stored if k[0] == "models"}
    text = appliance("objects", "status", "--home", str(home), env=env).stdout
    assert text.startswith(f"filesystem at {home / 'blobs'}\n") and "684.6 KiB" in text
