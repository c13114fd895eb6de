"""Signing in on the real stack, the governance stack of tests/gateway/conftest.py: passwords
(POST /auth/login, the `appliance login` CLI) and JWTs from a test identity provider (an RSA
key pair made for the session, its JWKS in a file that the profile names). Each test signs
in as users of its own."""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
import subprocess
import time

import httpx
import pytest

from appliance.auth import SIGN_IN_REFUSED
from services.gateway.admin_auth import FAILURE_DELAY_S, MAX_FAILURES
from tests.appliance.test_jwt_auth import Provider
from tests.conftest import BIN
from tests.gateway.conftest import SESSION_TTL_S

pytestmark = pytest.mark.stack

CLIENT_ENV = ("APPLIANCE_URL", "APPLIANCE_KEY", "APPLIANCE_HOME", "XDG_CONFIG_HOME")
PASSWORD = "correct horse battery"


@pytest.fixture
def stack(governance_stack):
    return governance_stack


def user(stack, name: str, role: str = "developer", disabled: bool = False) -> str:
    """A user with PASSWORD; answers `name`."""
    admin = api(stack, stack.admin_key)
    assert admin.post("/admin/users", json={"name": name, "role": role, "password": PASSWORD}).status_code == 201
    if disabled:
        assert admin.patch(f"/admin/users/{name}", json={"disabled": True}).status_code == 200
    return name


def api(stack, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def login(stack, username: str, password: str) -> httpx.Response:
    return api(stack).post("/auth/login", json={"username": username, "password": password})


def me(stack, token: str, status: int = 200) -> httpx.Response:
    """GET /auth/me until it answers `status` (the gateway reloads keys and sessions every second)."""
    deadline = time.monotonic() + 10
    while (response := api(stack, token).get("/auth/me")).status_code != status and time.monotonic() < deadline:
        time.sleep(0.05)
    return response


def audit(stack, action: str, target: str) -> list[dict]:
    return api(stack, stack.admin_key).get("/admin/audit", params={"action": action, "target": target}).json()


def test_a_password_sign_in_is_a_session_that_works_as_a_key_until_sign_out(stack, unique):
    dev = user(stack, unique("dev"))
    answer = login(stack, dev, PASSWORD)
    assert answer.status_code == 200, answer.text
    session = answer.json()
    assert session["user"] == dev and session["role"] == "developer" and session["token"].startswith("sk-ap-")
    assert SESSION_TTL_S - 10 < session["expires_at"] - time.time() <= SESSION_TTL_S  # auth.session_ttl_s
    caller = me(stack, session["token"]).json()
    assert (caller["name"], caller["role"], caller["key_id"]) == (dev, "developer", session["session_id"])
    assert caller["user_id"].startswith("usr_") and session["token"] not in json.dumps(caller)
    assert api(stack, session["token"]).get("/admin/models").status_code == 200
    denied = api(stack, session["token"]).get("/admin/audit")
    assert denied.status_code == 403 and "'audit.read'" in denied.json()["error"]["message"]
    [entry] = audit(stack, "auth.login", f"user/{dev}")
    assert entry["outcome"] == "ok" and entry["key_id"] == session["session_id"]
    assert entry["detail"]["session"] == session["session_id"] and session["token"] not in json.dumps(entry)

    assert api(stack, session["token"]).post("/auth/logout").status_code == 200
    assert me(stack, session["token"], 401).status_code == 401
    [logout] = audit(stack, "auth.logout", f"session/{session['session_id']}")
    assert logout["outcome"] == "ok"


def test_a_wrong_password_an_unknown_user_and_a_disabled_user_get_the_same_401(stack, unique):
    dev, nobody = user(stack, unique("dev")), unique("nobody")
    away = user(stack, unique("away"), "viewer", disabled=True)
    answers = {}
    for name, password in ((dev, "wrong password!"), (nobody, PASSWORD), (away, PASSWORD)):
        started = time.monotonic()
        answers[name] = login(stack, name, password)
        assert time.monotonic() - started >= FAILURE_DELAY_S
    assert {r.status_code for r in answers.values()} == {401}
    assert {(r.json()["error"]["message"], r.json()["error"]["code"]) for r in answers.values()} == \
        {(SIGN_IN_REFUSED, "invalid_credentials")}
    outcomes = {name: audit(stack, "auth.login", f"user/{name}")[0]["outcome"] for name in answers}
    assert outcomes == {dev: "refused: wrong password", nobody: "refused: unknown user",
                        away: "refused: user disabled"}


def test_a_login_body_that_is_not_valid_is_a_400_naming_the_field(stack):
    response = api(stack).post("/auth/login", json={"username": "dev"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "password"


def test_guessing_is_locked_out_after_too_many_refusals_even_in_parallel(stack, unique):
    guessed, dev = user(stack, unique("guessed"), "viewer"), user(stack, unique("dev"))
    with concurrent.futures.ThreadPoolExecutor(3 * MAX_FAILURES) as pool:
        refusals = list(pool.map(lambda _: login(stack, guessed, "guess guess").status_code,
                                 range(3 * MAX_FAILURES)))
    assert sorted(refusals) == [401] * MAX_FAILURES + [429] * (2 * MAX_FAILURES), refusals
    locked = login(stack, guessed, PASSWORD)  # even the right password, from this address, for a while
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert login(stack, dev, PASSWORD).status_code == 200  # another name is not locked


def cli(*args: str, config_home, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    env["XDG_CONFIG_HOME"] = str(config_home)
    return subprocess.run([str(BIN / "appliance"), *args], capture_output=True, text=True, env=env, input=stdin,
                          timeout=60, cwd=config_home)


def test_appliance_login_keeps_a_private_session_that_the_admin_commands_use(stack, tmp_path, unique):
    dev = user(stack, unique("dev"))
    signed_in = cli("login", "--user", dev, "--password-stdin", "--url", stack.root, config_home=tmp_path,
                    stdin=PASSWORD + "\n")
    assert signed_in.returncode == 0, signed_in.stderr
    assert f"signed in to {stack.root} as {dev} (developer)" in signed_in.stdout
    session_file = tmp_path / "appliance" / "session"
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    session = json.loads(session_file.read_text())
    assert session["url"] == stack.root and session["user"] == dev
    me(stack, session["token"])

    listed = cli("models", "list", "--json", config_home=tmp_path)  # no --url, --key or home: the session's
    assert listed.returncode == 0, listed.stderr
    refused = cli("audit", "list", config_home=tmp_path)
    assert refused.returncode == 1 and "'audit.read'" in refused.stderr and "'developer'" in refused.stderr

    signed_out = cli("logout", config_home=tmp_path)
    assert signed_out.returncode == 0 and "signed out" in signed_out.stdout and not session_file.exists()
    assert me(stack, session["token"], 401).status_code == 401
    assert "not signed in" in cli("logout", config_home=tmp_path).stdout


def test_a_wrong_password_at_the_cli_is_an_error_and_keeps_no_session(stack, tmp_path, unique):
    dev = user(stack, unique("dev"))
    result = cli("login", "-u", dev, "--password-stdin", "--url", stack.root, config_home=tmp_path,
                 stdin="not the password\n")
    assert result.returncode == 1 and SIGN_IN_REFUSED in result.stderr and "HTTP 401" in result.stderr
    assert not (tmp_path / "appliance" / "session").exists()


def test_a_jwt_of_the_identity_provider_is_a_caller_mapped_to_its_team(stack, identity_provider, unique):
    kim, finance = unique("kim"), unique("finance")  # kim is no appliance user
    assert api(stack, stack.admin_key).post("/admin/teams", json={"name": finance, "rpm": 5}).status_code == 201
    token = identity_provider.token(preferred_username=kim, groups=[f"/{finance}"])
    deadline = time.monotonic() + 10  # the gateway reads teams every second: this one is new
    while (caller := me(stack, token).json())["team_id"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (caller["name"], caller["role"], caller["key_id"], caller["user_id"]) == (kim, "developer", None, None)
    assert caller["team_id"].startswith("team_") and caller["team_limits"] == {"rpm": 5}
    assert api(stack, token).get("/v1/models").status_code == 200
    assert api(stack, token).get("/admin/models").status_code == 200
    assert api(stack, token).get("/admin/users").status_code == 403


def test_a_jwt_that_is_expired_or_not_signed_by_the_provider_is_a_401(stack, identity_provider):
    for token in (identity_provider.token(exp=time.time() - 300), Provider(kid=identity_provider.kid).token(),
                  identity_provider.token(iss="https://elsewhere.example")):
        for path in ("/auth/me", "/v1/models"):
            response = api(stack, token).get(path)
            assert response.status_code == 401, (path, response.text)
