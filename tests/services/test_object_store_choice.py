"""Which object store a profile gets (`appliance up`, systemd), and where its backups go."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import BackupConfig, load_profile, parse_profile
from appliance.errors import ProfileError
from appliance.objectstore import FilesystemSettings, S3Settings
from services.storage.litestream import backup_target
from services.storage.minio import minio_binary, resolve_object_store


def with_storage(tmp_path: Path, **storage):
    data = {"name": "p", "models": [{"name": "m", "engine": "remote", "base_url": "http://h/v1"}], "storage": storage}
    return parse_profile(data, source="test", base_dir=tmp_path)


@pytest.mark.skipif(minio_binary("") is not None, reason="a MinIO binary is installed beside Python: auto picks it")
def test_auto_without_a_minio_binary_is_the_filesystem_store_in_the_home(tmp_path):
    store, server = resolve_object_store(load_profile("edge-cpu"), tmp_path / "home", env={"PATH": str(tmp_path)})
    assert store == FilesystemSettings(path=str(tmp_path / "home" / "blobs")) and server is None
    assert store.label == f"filesystem at {tmp_path / 'home' / 'blobs'}"


def test_filesystem_store_in_a_folder_of_its_own(tmp_path):
    profile = with_storage(tmp_path, object_store="filesystem", data_path="objects-disk")
    assert resolve_object_store(profile, tmp_path / "home", env={}) == (
        FilesystemSettings(path=str(tmp_path / "objects-disk")), None)


def test_filesystem_store_has_no_endpoint(tmp_path):
    with pytest.raises(ProfileError, match="storage.endpoint: not used by object_store 'filesystem'"):
        with_storage(tmp_path, object_store="filesystem", endpoint="http://127.0.0.1:9000")


def test_the_managed_minio_is_read_not_made_by_a_client(tmp_path):
    fake_install = tmp_path / "bin"
    fake_install.mkdir()
    (fake_install / "minio").write_text("#!/bin/sh\n")  # found on PATH; never run
    (fake_install / "minio").chmod(0o755)
    profile = with_storage(tmp_path, object_store="minio")
    with pytest.raises(ProfileError, match="the managed MinIO, which has not run in .* yet"):
        resolve_object_store(profile, tmp_path / "home", env={"PATH": str(fake_install)}, as_client=True)
    assert not (tmp_path / "home").exists()


def test_backups_of_a_filesystem_store_go_to_files(tmp_path):
    home = tmp_path / "home"
    fs = FilesystemSettings(path=str(home / "blobs"))
    s3 = S3Settings(endpoint="http://127.0.0.1:9000", access_key="a", secret_key="b")
    auto = backup_target(BackupConfig(), home, fs)
    assert (auto.kind, auto.path) == ("file", str(tmp_path / "home-backups"))  # beside the home, not in the store
    inside = backup_target(BackupConfig(target="object-store"), home, fs)
    assert (inside.kind, inside.path) == ("file", str(home / "blobs" / "backups" / "litestream"))
    assert backup_target(BackupConfig(), home, s3).kind == "s3"
    assert backup_target(BackupConfig(), home, None).kind == "file"
