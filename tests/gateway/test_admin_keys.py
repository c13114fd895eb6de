"""API keys through the admin API, from the real CLI, on a stack of its own (a remote model
only, so it starts in seconds) that listens on every interface at a free port: the CLI
finds it from the home, with no APPLIANCE_URL."""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest
from rich.console import Console

from appliance.config import GatewayConfig
from installer.install import Installer
from installer.layout import Layout
from tests.conftest import BIN, UPSTREAM_KEY_ENV, Stack, free_port, start_stack

pytestmark = pytest.mark.stack

CLIENT_ENV = ("APPLIANCE_URL", "APPLIANCE_KEY", "APPLIANCE_HOME")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("keys")
    profile = tmp / "profile.yaml"
    profile.write_text(f"name: keys\nmodels:\n  - name: remote-ok\n    engine: remote\n"
                       f"    base_url: {upstream.url('ok')}\n    api_key_env: {UPSTREAM_KEY_ENV}\n")
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key}, host="0.0.0.0")
    yield running
    if running.proc.poll() is None:
        running.stop()


def cli(*args: str, home=None, cwd=None) -> subprocess.CompletedProcess:
    """The installed `appliance`, told nothing about the gateway: no APPLIANCE_URL or APPLIANCE_KEY."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    if home is not None:
        env["APPLIANCE_HOME"] = str(home)
    return subprocess.run([str(BIN / "appliance"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def admin_key(stack) -> str:
    return (stack.home / "admin.key").read_text().strip()


def api(stack, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {key or admin_key(stack)}"}, timeout=30)


def create(stack, name: str, role: str = "developer", key: str | None = None) -> dict:
    response = api(stack, key).post("/admin/keys", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    return response.json()


def wait_status(stack, key: str, status: int) -> httpx.Response:
    """GET /v1/models with `key` until it answers `status` (the gateway reloads keys every second)."""
    deadline = time.monotonic() + 10
    while (response := api(stack, key).get("/v1/models")).status_code != status and time.monotonic() < deadline:
        time.sleep(0.2)
    return response


def audit(stack, *args: str) -> list[dict]:
    return json.loads(ok(cli("audit", "list", "--json", *args, home=stack.home)))


def test_the_cli_finds_the_gateway_on_its_port_from_the_home(stack, tmp_path):
    assert (stack.home / "run" / "gateway.url").read_text() == f"http://127.0.0.1:{stack.port}\n"  # 0.0.0.0: loopback
    listed = json.loads(ok(cli("keys", "list", "--json", "--home", str(stack.home), cwd=tmp_path)))
    assert [k["name"] for k in listed] == ["admin (first start)"]


def test_created_key_is_audited_with_its_creator_and_without_its_secret(stack):
    created = json.loads(ok(cli("keys", "create", "ci-bot", "--role", "developer", "--expires-in", "30d", "--json",
                                home=stack.home)))
    assert created["key"].startswith("sk-ap-") and created["id"].startswith("key_") and created["expires_at"] > time.time()
    [entry] = audit(stack, "--target", f"key/{created['id']}")
    assert entry["action"] == "key.create" and entry["outcome"] == "ok" and entry["key_name"] == "admin (first start)"
    assert entry["detail"] == {"name": "ci-bot", "role": "developer", "prefix": created["prefix"],
                               "expires_at": created["expires_at"]}
    assert created["key"] not in json.dumps(audit(stack))
    assert wait_status(stack, created["key"], 200).status_code == 200


def test_the_first_admin_key_is_audited_as_made_by_appliance_up(stack):
    first = [e for e in audit(stack, "--action", "key.create") if e["key_name"] == "appliance up"]
    assert len(first) == 1 and first[0]["detail"]["role"] == "admin" and first[0]["key_id"] is None


def test_revoke_is_audited_and_the_key_refused(stack):
    created = create(stack, "short-lived")
    assert wait_status(stack, created["key"], 200).status_code == 200
    assert f"revoked {created['id']} (short-lived)" in ok(cli("keys", "revoke", created["id"], home=stack.home))
    refused = wait_status(stack, created["key"], 401)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    [entry] = audit(stack, "--action", "key.revoke", "--target", f"key/{created['id']}")
    assert entry["outcome"] == "ok" and entry["detail"]["id"] == created["id"]
    listed = json.loads(ok(cli("keys", "list", "--all", "--json", home=stack.home)))
    assert {k["id"]: k["state"] for k in listed}[created["id"]] == "revoked"
    assert created["id"] not in ok(cli("keys", "list", home=stack.home))


def test_an_operator_cannot_mint_or_revoke_an_admin_key(stack):
    operator = create(stack, "ops", role="operator")["key"]
    assert wait_status(stack, operator, 200).status_code == 200
    denied = api(stack, operator).post("/admin/keys", json={"name": "escalate", "role": "admin"})
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "role"
    result = cli("keys", "create", "escalate", "--role", "admin", "--key", operator, home=stack.home)
    assert result.returncode == 1 and "HTTP 403, parameter role" in result.stderr
    first_admin = json.loads(ok(cli("keys", "list", "--json", home=stack.home)))[0]
    denied = api(stack, operator).post(f"/admin/keys/{first_admin['id']}/revoke")
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "key_id"
    assert create(stack, "made-by-ops", role="developer", key=operator)["role"] == "developer"
    refusals = audit(stack, "--action", "key.create")
    assert any(e["key_name"] == "ops" and e["outcome"].startswith("refused: the operator role cannot manage admin keys")
               for e in refusals)


@pytest.mark.parametrize("role", ["developer", "viewer"])
def test_developers_and_viewers_see_only_their_own_keys_and_a_viewer_makes_none(stack, role):
    """A key that belongs to no user lists only itself and (as a developer) makes none."""
    made = create(stack, f"a-{role}", role=role)
    key = made["key"]
    assert wait_status(stack, key, 200).status_code == 200
    listed = api(stack, key).get("/admin/keys")
    assert listed.status_code == 200 and [k["id"] for k in listed.json()] == [made["id"]], listed.text
    made = api(stack, key).post("/admin/keys", json={"name": "x"})
    assert made.status_code == 403, made.text
    if role == "viewer":
        assert made.json()["error"]["code"] == "insufficient_role"
    else:
        assert made.json()["error"]["param"] == "user"
    assert api(stack, key).post("/admin/keys/key_nope/revoke").status_code in (403, 404)
    assert "HTTP" not in cli("keys", "list", "--key", key, home=stack.home).stderr


def test_listing_never_shows_a_secret(stack):
    created = create(stack, "secretive")
    table = ok(cli("keys", "list", "--all", home=stack.home))
    as_json = ok(cli("keys", "list", "--all", "--json", home=stack.home))
    answer = api(stack).get("/admin/keys", params={"include_revoked": "true"}).text
    for shown in (table, as_json, answer):
        assert "secretive" in shown and created["key"] not in shown and "key_hash" not in shown
    assert all("key" not in row for row in json.loads(as_json))


@pytest.mark.parametrize("body, status, param", [
    ({"name": "x", "role": "wizard"}, 400, "role"),
    ({"name": "x", "expires_in": "soon"}, 400, "expires_in"),
    ({"name": "x", "expires_at": 1.0}, 400, "expires_at"),
    ({"name": "x", "expires_in": "1d", "expires_at": 2e9}, 400, "expires_in"),
    ({"name": "  "}, 400, "name"),
])
def test_bad_key_input_is_a_4xx_naming_the_parameter(stack, body, status, param):
    response = api(stack).post("/admin/keys", json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_bad_key_input_from_the_cli(stack):
    response = api(stack).post("/admin/keys/key_nope/revoke")
    assert response.status_code == 404 and response.json()["error"]["param"] == "key_id"
    for args, message in [(["keys", "revoke", "key_nope"], "no API key with id, prefix or name 'key_nope' (HTTP 404, parameter key_id)"),
                          (["keys", "create", "x", "--expires-in", "soon"], "(HTTP 400, parameter expires_in)"),
                          (["keys", "create", "  "], "a key needs a non-empty name (HTTP 400, parameter name)")]:
        result = cli(*args, home=stack.home)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = cli("keys", "create", "x", "--role", "wizard", home=stack.home)
    assert result.returncode == 2 and "'wizard' is not one of" in result.stderr


def test_url_and_key_options_reach_the_gateway_from_anywhere(stack, tmp_path):
    elsewhere = tmp_path / "not-the-home"  # no gateway.url, no admin.key: as on another machine
    key = admin_key(stack)
    rows = json.loads(ok(cli("keys", "list", "--json", "--url", stack.root, "--key", key, home=elsewhere)))
    assert "admin (first start)" in [r["name"] for r in rows]
    env_run = subprocess.run([str(BIN / "appliance"), "audit", "list", "--limit", "1"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "APPLIANCE_URL": stack.root, "APPLIANCE_KEY": key,
                                  "APPLIANCE_HOME": str(elsewhere)})
    assert env_run.returncode == 0, env_run.stderr
    missing = cli("keys", "list", "--url", stack.root, home=elsewhere)
    assert missing.returncode == 1 and "no API key: pass --key" in missing.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    wrong = cli("keys", "list", "--url", dead, home=stack.home)  # --url wins over the home's gateway
    assert wrong.returncode == 1 and f"cannot reach the gateway at {dead}:" in wrong.stderr


def test_bootstrap_makes_an_admin_key_without_the_api(stack, tmp_path):
    empty = cli("keys", "bootstrap", home=tmp_path / "empty")
    assert empty.returncode == 1 and "has no state database" in empty.stderr
    old = admin_key(stack)
    kept = cli("keys", "bootstrap", home=stack.home)  # the key file is never overwritten
    assert kept.returncode == 1 and "already holds an admin key" in kept.stderr and admin_key(stack) == old
    (stack.home / "admin.key").rename(tmp_path / "lost.key")
    out = ok(cli("keys", "bootstrap", home=stack.home))
    new = admin_key(stack)
    assert new != old and f"admin key: {new}" in out
    assert wait_status(stack, new, 200).status_code == 200
    [entry] = [e for e in audit(stack, "--action", "key.create") if e["key_name"] == "appliance keys bootstrap"]
    assert entry["detail"]["role"] == "admin" and entry["key_id"] is None


def monitoring_answers(root: str, key: str | None) -> dict[str, httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return {path: httpx.get(root + path, headers=headers, timeout=30)
            for path in ("/healthz", "/readyz", "/metrics", "/schema", "/schema/openapi.json")}


def test_a_metrics_key_reads_only_the_monitoring_routes(stack):
    operator = create(stack, "ops-for-metrics", role="operator")["key"]
    assert wait_status(stack, operator, 200).status_code == 200
    metrics_key = create(stack, "scraper", role="metrics", key=operator)["key"]  # the lowest role: anyone may mint it
    assert wait_status(stack, metrics_key, 403).json()["error"]["code"] == "insufficient_role"
    chat = {"model": "remote-ok", "messages": [{"role": "user", "content": "hi"}]}
    for response in [api(stack, metrics_key).post("/v1/chat/completions", json=chat),
                     api(stack, metrics_key).post("/v1/embeddings", json={"model": "remote-ok", "input": "x"}),
                     api(stack, metrics_key).get("/v1/models/remote-ok"),
                     api(stack, metrics_key).get("/admin/keys"), api(stack, metrics_key).get("/admin/audit")]:
        assert response.status_code == 403 and response.json()["error"]["code"] == "insufficient_role", response.text
    answers = monitoring_answers(stack.root, metrics_key)
    assert all(r.status_code == 200 for r in answers.values()), {p: r.status_code for p, r in answers.items()}
    assert "remote-ok" in answers["/readyz"].json()["models"]
    assert "metrics" in ok(cli("keys", "create", "--help", home=stack.home))


@pytest.fixture(scope="module")
def guarded_stack(tmp_path_factory, upstream):
    """gateway.metrics_require_key on. Ready once /readyz says so to a caller without a key, as a
    load balancer asks (start_stack reads the details, which need a key here)."""
    tmp = tmp_path_factory.mktemp("guarded")
    profile = tmp / "profile.yaml"
    profile.write_text(f"name: guarded\ngateway:\n  metrics_require_key: true\nmodels:\n  - name: remote-ok\n"
                       f"    engine: remote\n    base_url: {upstream.url('ok')}\n    api_key_env: {UPSTREAM_KEY_ENV}\n")
    home, port, output = tmp / "home", free_port(), tmp / "up.log"
    proc = subprocess.Popen([str(BIN / "appliance"), "up", "--profile", str(profile), "--home", str(home),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=output.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, UPSTREAM_KEY_ENV: upstream.key}, cwd=tmp)
    root, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            if httpx.get(root + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the guarded stack did not become ready:\n{output.read_text()}")
        time.sleep(0.2)
    running = Stack(home=home, port=port, proc=proc, admin_key=(home / "admin.key").read_text().strip(), output=output)
    yield running
    running.stop()


def test_metrics_require_key_guards_metrics_schema_and_readiness_details(guarded_stack):
    root = guarded_stack.root
    anonymous = monitoring_answers(root, None)
    assert anonymous["/healthz"].status_code == 200
    assert anonymous["/readyz"].status_code == 200 and anonymous["/readyz"].json() == {"status": "ready"}
    for path in ("/metrics", "/schema", "/schema/openapi.json"):
        assert anonymous[path].status_code == 401, (path, anonymous[path].text)
        assert anonymous[path].json()["error"]["code"] == "missing_api_key"
    assert monitoring_answers(root, "sk-ap-not-a-key")["/metrics"].status_code == 401
    admin = guarded_stack.admin_key
    metrics_key = create(guarded_stack, "scraper", role="metrics", key=admin)["key"]
    deadline = time.monotonic() + 10  # the gateway reloads keys every second
    while httpx.get(root + "/metrics", headers={"Authorization": f"Bearer {metrics_key}"}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for key in (metrics_key, admin):
        answers = monitoring_answers(root, key)
        assert all(r.status_code == 200 for r in answers.values()), {p: r.status_code for p, r in answers.items()}
        assert "remote-ok" in answers["/readyz"].json()["models"]
        assert "# HELP" in answers["/metrics"].text
    assert api(guarded_stack, metrics_key).get("/v1/models").status_code == 403


def test_the_bare_metal_install_records_the_gateway_url(tmp_path):
    layout = Layout(root=tmp_path)
    Installer(layout, Console(file=open(os.devnull, "w"))).gateway_url(GatewayConfig(host="::", port=9443))
    assert (tmp_path / "var/lib/appliance/run/gateway.url").read_text() == "http://[::1]:9443\n"


def test_a_clean_stop_removes_the_recorded_url(stack):
    stack.stop()
    assert not (stack.home / "run" / "gateway.url").exists()
