"""A second stack for the registry tests: as `make up` runs on a fresh clone, with the
embedded filesystem object store (tests/gateway/registry_stores.py puts each registry test
on it and on the shared S3 stack)."""

from __future__ import annotations

import pytest

from tests.conftest import Stack, start_stack, write_profile
from tests.gateway.registry_stores import path_without_minio


@pytest.fixture(scope="session")
def filesystem_stack(tmp_path_factory) -> Stack:
    """The profile says nothing of storage and no MinIO binary is on PATH: `auto` is the filesystem store."""
    tmp = tmp_path_factory.mktemp("fs-stack")
    running = start_stack(tmp, write_profile(tmp / "profile.yaml", None), env={"PATH": path_without_minio()})
    banner = running.output.read_text()
    assert f"object store:     filesystem at {running.home / 'blobs'}" in banner, banner
    yield running
    if running.proc.poll() is None:
        running.stop()
