"""Fixtures that run each registry test on both object stores: import them into a test module.

There `stack` becomes, in turn, the filesystem stack and the shared stack with its S3
server (moto), and `store_settings` names the chosen stack's store.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.objectstore import FilesystemSettings, ObjectStoreSettings


@pytest.fixture(params=["filesystem", "s3"])
def store_kind(request) -> str:
    return request.param


@pytest.fixture
def stack(request, store_kind, stack):  # the argument is the shared S3 stack of tests/conftest.py
    return request.getfixturevalue("filesystem_stack") if store_kind == "filesystem" else stack


@pytest.fixture
def store_settings(store_kind, stack, stack_store) -> ObjectStoreSettings:
    """The chosen stack's object store (`stack_store` is the S3 stack's)."""
    return FilesystemSettings(path=str(stack.home / "blobs")) if store_kind == "filesystem" else stack_store


def path_without_minio() -> str:
    """$PATH less the folders that hold a `minio`, so that `storage.object_store: auto` finds none there."""
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if not (Path(d) / "minio").exists())
