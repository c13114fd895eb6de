"""Stacks of the gateway tests beyond the shared one of tests/conftest.py: a second stack
for the registry tests, as `make up` runs on a fresh clone, with the embedded filesystem
object store (tests/gateway/registry_stores.py puts each registry test on it and on the
shared S3 stack); and the governance stack that the sign-in, role and user/team tests
share."""

from __future__ import annotations

import json
import secrets

import pytest

from tests.appliance.test_jwt_auth import AUDIENCE, ISSUER, Provider
from tests.conftest import UPSTREAM_KEY_ENV, Stack, start_stack, write_profile
from tests.gateway.registry_stores import path_without_minio

SESSION_TTL_S = 600


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


@pytest.fixture(scope="session")
def identity_provider() -> Provider:
    """The test identity provider whose JWTs the governance stack accepts."""
    return Provider()


@pytest.fixture(scope="session")
def governance_stack(tmp_path_factory, upstream, identity_provider) -> Stack:
    """A remote model only, so it starts in seconds; password sessions last SESSION_TTL_S and
    JWTs of `identity_provider` sign in. Every test on it names its own users, teams and keys
    (`unique`) and counts only what it made."""
    tmp = tmp_path_factory.mktemp("governance")
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(identity_provider.jwks()))
    profile = tmp / "profile.yaml"
    profile.write_text(f"name: governance\nmodels:\n  - name: remote-ok\n    engine: remote\n"
                       f"    base_url: {upstream.url('ok')}\n    api_key_env: {UPSTREAM_KEY_ENV}\n"
                       f"auth:\n  session_ttl_s: {SESSION_TTL_S}\n  jwt:\n    jwks_file: {jwks}\n"
                       f"    issuer: {ISSUER}\n    audience: {AUDIENCE}\n")
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key})
    yield running
    if running.proc.poll() is None:
        running.stop()


@pytest.fixture
def unique():
    """This test's own names on a shared stack: unique("kim") is "kim-" and a suffix that this
    test alone uses (the same in every call, so unique("kim") names one user throughout)."""
    suffix = secrets.token_hex(3)
    return lambda name: f"{name}-{suffix}"
