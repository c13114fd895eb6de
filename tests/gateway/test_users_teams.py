"""Users, teams and keys with limits and policies, through the real CLI and admin API on the
governance stack of tests/gateway/conftest.py (a remote model only, so it starts in
seconds), each test with users, teams and keys of its own: ownership rules, live updates
the gateway sees within a second, deletion rules, and 4xx answers naming the parameter at
fault."""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest

from tests.conftest import BIN

pytestmark = pytest.mark.stack

CLIENT_ENV = ("APPLIANCE_URL", "APPLIANCE_KEY", "APPLIANCE_HOME")
PASSWORD = "correct horse battery"


@pytest.fixture
def stack(governance_stack):
    return governance_stack


def cli(stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV} | {"APPLIANCE_HOME": str(stack.home)}
    return subprocess.run([str(BIN / "appliance"), *args], capture_output=True, text=True, env=env, input=stdin,
                          timeout=60)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def cli_json(stack, *args: str, stdin: str | None = None):
    return json.loads(ok(cli(stack, *args, "--json", stdin=stdin)))


def api(stack, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {key or stack.admin_key}"}, timeout=30)


def me_until(stack, key: str, done, timeout: float = 10.0) -> dict:
    """GET /auth/me with `key` until `done(principal)`: the gateway follows changes within about a second."""
    start = time.monotonic()
    while True:
        response = api(stack, key).get("/auth/me")
        if response.status_code == 200 and done(response.json()):
            return response.json()
        assert time.monotonic() - start < timeout, response.text
        time.sleep(0.05)


def status_until(stack, key: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + 5
    while (response := api(stack, key).get("/v1/models")).status_code != status and time.monotonic() < deadline:
        time.sleep(0.1)
    return response


def audit(stack, *args: str) -> list[dict]:
    return cli_json(stack, "audit", "list", "--limit", "1000", *args)


def test_a_members_key_billed_to_a_team_follows_both_and_changes_live(stack, unique):
    finance, kim = unique("finance"), unique("kim")
    team = cli_json(stack, "teams", "create", finance, "--rpm", "100", "--models", "remote-*,local-*",
                    "--pii", "rrn=block,phone=mask", "--no-external", "--budget-cost", "50", "--period", "day")
    assert team["id"].startswith("team_")
    assert team["limits"] == {"models": ["remote-*", "local-*"], "rpm": 100, "budget_cost": 50.0, "period": "day"}
    assert team["policy"] == {"no_external": True, "pii": {"kr_rrn": "block", "phone": "mask"}}
    user = cli_json(stack, "users", "create", kim, "--role", "developer", "--email", "kim@example.com",
                    "--password-stdin", stdin=PASSWORD + "\n")
    assert user["has_password"] and user["role"] == "developer" and "password_hash" not in user
    assert f"{kim} is a member of {finance}" in ok(cli(stack, "teams", "add-member", finance, kim))
    key = cli_json(stack, "keys", "create", unique("kim-laptop"), "--user", kim, "--team", finance, "--rpm", "10",
                   "--pii", "mask", "--injection", "flag", "--expires-in", "30d")
    assert (key["user_id"], key["team_id"], key["role"]) == (user["id"], team["id"], "developer")

    shown = cli_json(stack, "keys", "show", key["id"])
    assert (shown["user_name"], shown["team_name"], shown["limits"]) == (kim, finance, {"rpm": 10})
    assert "key" not in shown and "key_hash" not in shown
    text = ok(cli(stack, "keys", "show", key["prefix"]))
    assert f"owner: user {kim}, team {finance}" in text and "limits: rpm=10" in text and "injection=flag" in text

    principal = me_until(stack, key["key"], lambda p: True)
    assert (principal["key_id"], principal["role"], principal["user_id"], principal["team_id"]) == (
        key["id"], "developer", user["id"], team["id"])
    assert principal["limits"] == {"rpm": 10} and principal["team_limits"] == team["limits"]
    # the key's phone=mask equals the team's "*": mask, so the merged policy needs no entry for it
    assert principal["policy"] == {"no_external": True, "pii": {"*": "mask", "kr_rrn": "block"}, "injection": "flag"}

    ok(cli(stack, "teams", "update", finance, "--injection", "block", "--deny", "project x", "--rpm", "off"))
    principal = me_until(stack, key["key"], lambda p: p["policy"].get("injection") == "block")
    assert principal["policy"]["deny"] == ["project x"] and "rpm" not in principal["team_limits"]
    updated = cli_json(stack, "keys", "update", key["id"], "--rpm", "off", "--tpm", "500", "--pii", "off")
    assert updated["limits"] == {"tpm": 500} and updated["policy"] == {"injection": "flag"}
    principal = me_until(stack, key["key"], lambda p: p["limits"] == {"tpm": 500})
    assert principal["policy"]["pii"] == {"kr_rrn": "block", "phone": "mask"}

    [change] = audit(stack, "--action", "key.update", "--target", f"key/{key['id']}")
    assert change["outcome"] == "ok" and change["detail"] == {"id": key["id"],
                                                              "changes": {"rpm": None, "tpm": 500, "pii": None}}
    [created] = audit(stack, "--action", "user.create", "--target", f"user/{kim}")
    assert created["detail"]["has_password"] is True and PASSWORD not in json.dumps(audit(stack))
    shown = cli_json(stack, "teams", "show", finance)
    assert [m["name"] for m in shown["members"]] == [kim] and [k["id"] for k in shown["keys"]] == [key["id"]]
    assert [t["name"] for t in cli_json(stack, "users", "show", kim)["teams"]] == [finance]


def test_a_users_key_has_at_most_their_role_and_only_their_teams(stack, unique):
    lee, research = unique("lee"), unique("research")
    ok(cli(stack, "users", "create", lee, "--role", "viewer"))
    ok(cli(stack, "teams", "create", research))
    escalate = cli(stack, "keys", "create", unique("lee-ops"), "--user", lee, "--role", "operator")
    assert escalate.returncode == 1 and "(HTTP 403, parameter role)" in escalate.stderr
    outsider = cli(stack, "keys", "create", unique("lee-research"), "--user", lee, "--team", research)
    assert outsider.returncode == 1 and f"not a member of team '{research}'" in outsider.stderr
    assert "(HTTP 400, parameter team)" in outsider.stderr
    assert cli_json(stack, "keys", "create", unique("lee-read"), "--user", lee)["role"] == "viewer"
    service = cli_json(stack, "keys", "create", unique("research-etl"), "--team", research, "--max-parallel", "4")
    assert service["user_id"] is None and service["limits"] == {"max_parallel": 4}


def test_disabling_a_user_refuses_their_keys_within_a_second(stack, unique):
    park = unique("park")
    ok(cli(stack, "users", "create", park, "--role", "developer"))
    key = cli_json(stack, "keys", "create", unique("park-key"), "--user", park)["key"]
    assert status_until(stack, key, 200).status_code == 200
    ok(cli(stack, "users", "update", park, "--disable"))
    refused = status_until(stack, key, 401)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "user_disabled"
    ok(cli(stack, "users", "update", park, "--enable"))
    assert status_until(stack, key, 200).status_code == 200


def test_deleting_a_team_with_keys_needs_force_and_deleting_a_user_revokes_theirs(stack, unique):
    ops, ann = unique("ops"), unique("ann")
    ok(cli(stack, "teams", "create", ops))
    ok(cli(stack, "users", "create", ann, "--role", "operator"))
    own = cli_json(stack, "keys", "create", unique("ann-own"), "--user", ann)  # before she joins: billed to no team
    ok(cli(stack, "teams", "add-member", ops, ann))
    billed = cli_json(stack, "keys", "create", unique("ann-ops"), "--user", ann)  # billed to her (first) team
    assert (own["team_id"], billed["team_id"]) == (None, cli_json(stack, "teams", "show", ops)["id"])
    leave = cli(stack, "teams", "remove-member", ops, ann)
    assert leave.returncode == 1 and "(HTTP 409, parameter user)" in leave.stderr and billed["id"] in leave.stderr
    refused = cli(stack, "teams", "delete", ops)
    assert refused.returncode == 1 and "(HTTP 409, parameter force)" in refused.stderr
    deleted = cli_json(stack, "teams", "delete", ops, "--force")
    assert deleted["revoked_keys"] == [billed["id"]]
    assert status_until(stack, billed["key"], 401).status_code == 401
    assert status_until(stack, own["key"], 200).status_code == 200
    assert cli_json(stack, "users", "show", ann)["teams"] == []
    gone = cli_json(stack, "users", "delete", ann)
    assert gone["revoked_keys"] == [own["id"]] and ann in gone["name"]
    assert status_until(stack, own["key"], 401).status_code == 401
    [entry] = audit(stack, "--action", "user.delete", "--target", f"user/{ann}")
    assert entry["detail"]["revoked_keys"] == [own["id"]]
    missing = cli(stack, "users", "show", ann)
    assert missing.returncode == 1 and "(HTTP 404, parameter user)" in missing.stderr


def test_a_password_is_never_shown_and_a_new_one_ends_the_sessions(stack, unique):
    cho = unique("cho")
    ok(cli(stack, "users", "create", cho, "--role", "viewer"))
    assert f"password set for {cho}" in ok(cli(stack, "users", "set-password", cho, "--password-stdin",
                                               stdin=PASSWORD + "\n"))
    listed = ok(cli(stack, "users", "list", "--json"))
    assert PASSWORD not in listed and "$argon2" not in listed
    assert {u["name"]: u["has_password"] for u in json.loads(listed)}[cho] is True
    login = httpx.post(stack.root + "/auth/login", json={"username": cho, "password": PASSWORD}, timeout=30)
    assert login.is_success, login.text
    session = login.json()["token"]
    assert status_until(stack, session, 200).status_code == 200
    ok(cli(stack, "users", "set-password", cho, "--password-stdin", stdin="another " + PASSWORD + "\n"))
    assert status_until(stack, session, 401).json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("method, path, body, status, param", [
    ("POST", "/admin/teams", {"name": "t1", "rpm": 0}, 400, "rpm"),
    ("POST", "/admin/teams", {"name": "t1", "models": []}, 400, "models"),
    ("POST", "/admin/teams", {"name": "t1", "pii": {"nope": "mask"}}, 400, "pii.nope"),
    ("POST", "/admin/teams", {"name": "t1", "pii": {"rrn": "shred"}}, 400, "pii.rrn"),
    ("POST", "/admin/teams", {"name": "t1", "budget_cost": -2}, 400, "budget_cost"),
    ("POST", "/admin/teams", {"name": "t1", "deny": ["re:("]}, 400, "deny"),
    ("POST", "/admin/teams", {"name": "t1", "bogus": 1}, 400, "bogus"),
    ("POST", "/admin/teams", {"name": "a b"}, 400, "name"),
    ("POST", "/admin/users", {"name": "u1", "role": "metrics"}, 400, "role"),
    ("POST", "/admin/users", {"name": "u1", "role": "viewer", "password": "short"}, 400, "password"),
    ("POST", "/admin/users", {"name": "u1", "role": "viewer", "email": "nope"}, 400, "email"),
    ("POST", "/admin/users", {"role": "viewer"}, 400, "name"),
    ("POST", "/admin/keys", {"name": "k1", "user": "ghost"}, 404, "user"),
    ("POST", "/admin/keys", {"name": "k1", "team": "ghost"}, 404, "team"),
    ("POST", "/admin/keys", {"name": "k1", "tpm": "many"}, 400, "tpm"),
    ("PATCH", "/admin/keys/key_nope", {"rpm": 1}, 404, "key_id"),
    ("PATCH", "/admin/users/ghost", {"role": "viewer"}, 404, "user"),
    ("PATCH", "/admin/teams/ghost", {"rpm": 1}, 404, "team"),
    ("POST", "/admin/teams/ghost/members", {"user": "ghost"}, 404, "team"),
])
def test_bad_input_is_a_4xx_naming_the_parameter(stack, method, path, body, status, param):
    response = api(stack).request(method, path, json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_duplicates_and_bad_updates(stack, unique):
    assert api(stack).post("/admin/teams", json={"name": unique("dup")}).status_code == 201
    again = api(stack).post("/admin/teams", json={"name": unique("dup")})
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    key = api(stack).post("/admin/keys", json={"name": unique("k")}).json()
    negative = api(stack).patch(f"/admin/keys/{key['id']}", json={"rpm": -1})
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "rpm"
    api(stack).post(f"/admin/keys/{key['id']}/revoke")
    revoked = api(stack).patch(f"/admin/keys/{key['id']}", json={"rpm": 1})
    assert revoked.status_code == 409 and revoked.json()["error"]["param"] == "key_id"


def test_bad_input_from_the_cli(stack):
    for args, code, message in [
        (["keys", "create", "x", "--pii", "rrn"], 2, "expected DETECTOR=ACTION"),
        (["teams", "create", "x", "--rpm", "lots"], 2, "'lots' is not a number or 'off'"),
        (["teams", "update", "ghost", "--rpm", "1"], 1, "no team with id or name 'ghost' (HTTP 404, parameter team)"),
        (["teams", "update", "dup"], 2, "nothing to change"),
        (["keys", "create", "x", "--models", ","], 1, "an empty model list allows no model at all"),
        (["users", "create", "x"], 2, "Missing option '--role'"),
    ]:
        result = cli(stack, *args)
        assert result.returncode == code and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_developer_manages_only_their_own_keys(stack, unique):
    dev1, dev2 = unique("dev1"), unique("dev2")
    ok(cli(stack, "users", "create", dev1, "--role", "developer"))
    ok(cli(stack, "users", "create", dev2, "--role", "developer"))
    mine = cli_json(stack, "keys", "create", unique("dev1-main"), "--user", dev1)
    theirs = cli_json(stack, "keys", "create", unique("dev2-main"), "--user", dev2)
    assert status_until(stack, mine["key"], 200).status_code == 200
    as_dev = api(stack, mine["key"])
    made = as_dev.post("/admin/keys", json={"name": unique("dev1-ci"), "rpm": 5})
    assert made.status_code == 201 and made.json()["user_id"] == mine["user_id"], made.text
    assert {k["name"] for k in as_dev.get("/admin/keys").json()} == {unique("dev1-main"), unique("dev1-ci")}
    for response in [as_dev.post("/admin/keys", json={"name": unique("for-dev2"), "user": dev2}),
                     as_dev.get(f"/admin/keys/{theirs['id']}"), as_dev.post(f"/admin/keys/{theirs['id']}/revoke")]:
        assert response.status_code == 403, response.text
    assert as_dev.get(f"/admin/keys/{theirs['id']}").json()["error"]["param"] == "key_id"
    assert as_dev.post("/admin/keys", json={"name": "x", "user": dev2}).json()["error"]["param"] == "user"
    ownerless = cli_json(stack, "keys", "create", unique("no-user"), "--role", "developer")["key"]
    assert status_until(stack, ownerless, 200).status_code == 200
    refused = api(stack, ownerless).post("/admin/keys", json={"name": "x"})
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "user"
    assert [k["name"] for k in api(stack, ownerless).get("/admin/keys").json()] == [unique("no-user")]


def test_the_openapi_document_describes_the_bodies(stack):
    document = api(stack).get("/schema/openapi.json").json()
    for path, method, schema in [("/admin/keys/{key_id}", "patch", "UpdateKey"), ("/admin/teams", "post", "CreateTeam"),
                                 ("/admin/users/{name}", "patch", "UpdateUser")]:
        body = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{schema}"}
    assert {"rpm", "pii", "no_external", "expires_at"} <= set(document["components"]["schemas"]["UpdateKey"]["properties"])
