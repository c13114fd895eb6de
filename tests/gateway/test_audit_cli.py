"""`appliance audit list|verify|export` through a real gateway (a remote model only, so it
starts in seconds): the chain verifies, exports as JSON lines, and a row edited in the
home's state.db is named by `audit verify`, through the gateway and with --local."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import httpx
import pytest

from appliance import audit
from tests.conftest import BIN, UPSTREAM_KEY_ENV, start_stack

pytestmark = pytest.mark.stack

CLIENT_ENV = ("APPLIANCE_URL", "APPLIANCE_KEY", "APPLIANCE_HOME")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("audit")
    profile = tmp / "profile.yaml"
    profile.write_text(f"name: audit\nmodels:\n  - name: remote-ok\n    engine: remote\n"
                       f"    base_url: {upstream.url('ok')}\n    api_key_env: {UPSTREAM_KEY_ENV}\n")
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key})
    yield running
    if running.proc.poll() is None:
        running.stop()


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    return subprocess.run([str(BIN / "appliance"), *args, "--home", str(stack.home)], capture_output=True, text=True,
                          env=env, timeout=60)


def api(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def test_list_verify_and_export(stack, tmp_path):
    for name in ("svc-a", "svc-b"):
        assert api(stack).post("/admin/keys", json={"name": name, "role": "developer"}).status_code == 201
    listed = cli(stack, "audit", "list", "--json", "--action", "key.create")
    assert listed.returncode == 0, listed.stderr
    assert [r["detail"]["name"] for r in json.loads(listed.stdout)] == ["svc-b", "svc-a", "admin (first start)"]

    verified = cli(stack, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("ok: 3 rows, chain intact from row 1"), verified.stdout  # first admin key + 2

    out = tmp_path / "audit.jsonl"
    exported = cli(stack, "audit", "export", "--since", "1d", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["action"] for r in rows] == ["key.create", "key.create", "key.create", "audit.export"]
    assert all(r["prev_hash"] == prev["hash"] for prev, r in zip(rows, rows[1:]))
    assert rows[1]["detail"]["name"] == "svc-a" and rows[1]["key_name"] == "admin (first start)"
    assert not (tmp_path / "audit.jsonl.partial").exists()

    assert cli(stack, "audit", "export", "--until", "2000-01-01").stdout == ""
    bad = cli(stack, "audit", "export", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_bad_export_parameters_are_400s_naming_them(stack):
    for query, param in (("since=soon", "since"), ("until=nan", "until")):
        response = api(stack).get(f"/admin/audit/export?{query}")
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_an_edited_row_is_named_by_verify(stack):
    verification = api(stack).get("/admin/audit/verify").json()
    assert verification["ok"] and verification["last_id"] >= 3
    with sqlite3.connect(stack.home / "state.db") as conn:
        conn.execute("UPDATE audit_log SET outcome = 'refused: nothing happened' WHERE id = 2")
    for local in ((), ("--local",)):
        result = cli(stack, "audit", "verify", *local)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stdout.startswith("bad row 2: row 2 was edited"), result.stdout
    as_json = json.loads(cli(stack, "audit", "verify", "--json").stdout)
    assert (as_json["ok"], as_json["bad_id"], as_json["problem"]) == (False, 2, "edited")
    assert audit.Verification(**as_json).rows == 1
