"""The console from another machine on the LAN: a gateway listening on an address that is
not the local default, and a user's shell with no appliance home, no admin key and no
settings, only `appliance login`. The console finds the gateway and the token through the
session alone, and what it changes is done, and audited, as the signed-in user."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from tests.conftest import BIN, start_stack, write_profile
from tests.gateway.registry_stores import path_without_minio
from tests.tui.conftest import Terminal

pytestmark = pytest.mark.stack

ADDRESS = "127.0.0.2"  # on loopback still (these tests reach no network), but not 127.0.0.1
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def remote_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    running = start_stack(tmp, write_profile(tmp / "profile.yaml", None), env={"PATH": path_without_minio()},
                          host=ADDRESS)
    yield running
    running.stop()


@pytest.fixture
def laptop(tmp_path) -> dict[str, str]:
    """A user's environment elsewhere: its own home and config folder, nothing of the appliance."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config"),
           "LANG": "C.UTF-8"}
    return env


def test_a_signed_in_user_runs_the_console_against_a_gateway_elsewhere(remote_stack, laptop, tmp_path):
    admin = httpx.Client(base_url=remote_stack.root, headers={"Authorization": f"Bearer {remote_stack.admin_key}"})
    alice = admin.post("/admin/users", json={"name": "alice", "role": "operator", "password": PASSWORD}).json()
    with pytest.raises(httpx.ConnectError):  # nothing of it on the default address
        httpx.get(f"http://127.0.0.1:{remote_stack.port}/readyz")

    appliance = str(BIN / "appliance")
    signed_in = subprocess.run([appliance, "login", "--url", remote_stack.root, "--user", "alice", "--password-stdin"],
                               input=PASSWORD, env=laptop, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert signed_in.returncode == 0, signed_in.stderr

    terminal = Terminal([appliance, "console"], laptop, tmp_path)  # no --url, no --key
    try:
        terminal.wait_for(f"{ADDRESS}:{remote_stack.port}", "alice (operator)", "smollm2-135m-instruct")
        terminal.type(b":keys\r")
        terminal.wait_for("keys [")
        terminal.type(b"n")
        terminal.wait_for("New API key")
        terminal.type(b"from-the-laptop")
        terminal.wait_for("from-the-laptop")
        terminal.type(b"\x13")  # ctrl+s saves
        terminal.wait_for("its secret")
        terminal.type(b"\r")  # closes the secret
        terminal.wait_for("from-the-laptop", "keys [")
        terminal.type(b"\x11")  # ctrl+q
        assert terminal.exit_code() == 0, "the console did not quit on ctrl+q"
    finally:
        terminal.close()

    key = next(k for k in admin.get("/admin/keys").json() if k["name"] == "from-the-laptop")
    entry = admin.get("/admin/audit", params={"action": "key.create", "target": f"key/{key['id']}"}).json()
    [made] = entry if isinstance(entry, list) else entry["entries"]
    assert (made["user_id"], made["role"], made["outcome"]) == (alice["id"], "operator", "ok")
