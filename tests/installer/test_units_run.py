"""The rendered systemd units' commands, run as systemd would run them (no systemd here):
the gateway serves the registries from the object store (an S3 server, or the filesystem
store in a folder of its own), the worker runs queued imports, the deployment controller
starts what is deployed, and Litestream replicates both databases (to the S3 server with
its own credentials, or to the backup folder beside the home)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from appliance.config import parse_profile
from appliance.planning.inventory import read_inventory
from installer.layout import Layout
from appliance.planning.planner import make_plan
from installer.systemd import render_systemd
from tests.conftest import QUESTION, SYSTEM, appliance, default_gguf, free_port, s3_env

pytestmark = pytest.mark.stack

INVENTORY = Path(__file__).parents[1] / "inventories" / "edge-cpu-here.json"


def unit_process(unit: Path, log: Path) -> subprocess.Popen:
    """Start a unit's ExecStart with its Environment=, EnvironmentFile= and UnsetEnvironment=."""
    env = dict(os.environ)
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
        elif key == "EnvironmentFile":
            path = Path(value.lstrip("-"))
            if path.exists():
                env.update(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
        elif key == "UnsetEnvironment":
            env.pop(value, None)
        elif key == "ExecStart":
            argv = shlex.split(value)
    return subprocess.Popen(argv, env=env, cwd=log.parent, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.mark.parametrize("store_kind", ["s3", "filesystem"])
def test_units_serve_registries_deploy_and_replicate(tmp_path, request, store_kind):
    if store_kind == "s3":
        store = request.getfixturevalue("object_store_settings")
        storage = {"object_store": "s3", "endpoint": store.endpoint, "bucket_prefix": store.bucket_prefix}
        env, replica = s3_env(store), f"s3://{store.bucket_prefix}backups/litestream/{{db}}"
    else:
        storage = {"object_store": "filesystem", "data_path": str(tmp_path / "objects")}
        env, replica = {}, f"file://{tmp_path}/data-backups/{{db}}"
    port = free_port()
    profile = parse_profile({
        "name": "units", "gateway": {"host": "127.0.0.1", "port": port},
        "models": [{"name": "elsewhere", "engine": "remote", "base_url": f"http://127.0.0.1:{free_port()}/v1"}],
        "storage": storage,
    }, source="test", base_dir=tmp_path)
    layout = Layout(prefix=Path(sys.prefix), etc=tmp_path / "etc", data=tmp_path / "data", units=tmp_path / "units")
    render_systemd(profile, make_plan(profile, [read_inventory(INVENTORY)]), layout, Path("/"), env=env)
    layout.data.mkdir()
    (layout.data / "run").mkdir()
    procs = [unit_process(layout.units / f"appliance-{name}.service", tmp_path / f"{name}.log")
             for name in ("gateway", "controller", "worker", "litestream")]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(url))
        appliance("keys", "bootstrap", home=layout.data)  # the gateway made state.db; no key exists yet
        secret = (layout.data / "admin.key").read_text().strip()
        wait_for(lambda: httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200)
        admin = {"--url": url, "--key": secret}
        flags = [part for pair in admin.items() for part in pair]
        queued = msgspec.json.decode(appliance("models", "register", "smol", str(default_gguf()), "--server-path",
                                               "--background", "--json", *flags).stdout)
        waited = appliance("jobs", "wait", queued["id"], *flags).stdout
        assert "model.import  succeeded  model=smol, version=1" in waited
        if store_kind == "filesystem":
            assert len(list((tmp_path / "objects" / "models" / "sha256").iterdir())) == 1
        out = appliance("models", "deploy", "smol:1", "--as", "smol-units", "--context-length", "1024", *flags).stdout
        assert "is running as smol-units" in out
        answer = openai.OpenAI(base_url=url + "/v1", api_key=secret).chat.completions.create(
            model="smol-units", temperature=0, max_tokens=20,
            messages=[SYSTEM, QUESTION])
        assert "Paris" in answer.choices[0].message.content

        status = wait_for(lambda: _all_in_sync(_backup_status(layout)))
        replicas = [db["replica"].split("?")[0] for db in status["databases"]]
        assert replicas == [replica.format(db=db) for db in ("state.db", "jobs.db")]
        assert status["replicating"]
        # The gateway reads the same from the config and credentials its unit is given.
        system = wait_for(lambda: _all_in_sync({"databases": httpx.get(
            url + "/admin/system", headers={"Authorization": f"Bearer {secret}"}).json()["backup"]}))
        assert [db["name"] for db in system["databases"]] == ["state.db", "jobs.db"]
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    assert "deployment controller stopped." in (tmp_path / "controller.log").read_text()
    assert "worker stopped." in (tmp_path / "worker.log").read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _all_in_sync(status: dict) -> dict | None:
    return status if all(db["state"] == "in sync" for db in status["databases"]) else None


def _backup_status(layout: Layout) -> dict:
    out = appliance("backup", "status", "--json", "--home", str(layout.data),
                    "--config", str(layout.etc / "litestream.yml"), env={"APPLIANCE_S3_ACCESS_KEY": "", "APPLIANCE_S3_SECRET_KEY": ""})
    return msgspec.json.decode(out.stdout)


def test_controller_refuses_a_file_that_is_not_a_runtime(tmp_path):
    from click.testing import CliRunner

    from appliance.cli import cli

    bad = tmp_path / "gateway.json"
    bad.write_text('{"models": []}')
    result = CliRunner().invoke(cli, ["controller", "--runtime", str(bad)])
    assert result.exit_code == 2 and "is not a gateway runtime file" in result.output and "home" in result.output
