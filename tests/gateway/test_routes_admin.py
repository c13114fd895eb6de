"""Routes through /admin/routes and `appliance routes`, on the shared stack: a route set there
is served within seconds, without a restart (listed in /v1/models, answered by its target,
which x-appliance-model names), bad input is a 400 naming the field, a viewer may read but
not change routes, and every change is audited. Each test names its own routes (`unique`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, QUESTION, appliance

pytestmark = pytest.mark.stack

RELOAD_S = 5.0  # the gateway reads routes each second; room for a busy machine


def api(stack, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {key or stack.admin_key}"}, timeout=30)


def until(check: Callable[[], object], timeout: float = RELOAD_S):
    """`check()` until it is truthy or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def model_ids(stack) -> set[str]:
    return {m["id"] for m in api(stack).get("/v1/models").json()["data"]}


def put(stack, name: str, body: dict, key: str | None = None) -> httpx.Response:
    return api(stack, key).put(f"/admin/routes/{name}", json=body)


def audited(stack, action: str, name: str) -> list[dict]:
    return api(stack).get("/admin/audit", params={"action": action, "target": f"route/{name}"}).json()


def test_a_canary_route_is_listed_with_its_shares_and_served_within_seconds(stack, unique):
    name = unique("canary")
    body = {"targets": [{"model": DEFAULT_MODEL, "weight": 95}, {"model": "remote-ok", "weight": 5}],
            "fallbacks": ["remote-broken"]}
    response = put(stack, name, body)
    assert response.status_code == 200, response.text
    route = response.json()
    assert route["targets"] == [{"model": DEFAULT_MODEL, "weight": 95, "share": 95.0},
                                {"model": "remote-ok", "weight": 5, "share": 5.0}]
    assert route["fallbacks"] == ["remote-broken"] and route["source"] == "admin"
    assert route["updated_by"] and route["replaces_profile_route"] is False
    assert api(stack).get(f"/admin/routes/{name}").json()["targets"] == route["targets"]
    [listed] = [r for r in api(stack).get("/admin/routes").json() if r["name"] == name]
    assert listed["source"] == "admin" and [t["share"] for t in listed["targets"]] == [95.0, 5.0]

    assert until(lambda: name in model_ids(stack)), f"{name} not in /v1/models"
    live = until(lambda: api(stack).get(f"/admin/routes/{name}").json().get("live"))
    assert live["targets"] == [{"model": DEFAULT_MODEL, "share": 95.0, "state": "ready"},
                               {"model": "remote-ok", "share": 5.0, "state": "ready"}]
    assert [f["model"] for f in live["fallbacks"]] == ["remote-broken"]
    [audit] = audited(stack, "route.set", name)
    assert audit["outcome"] == "ok" and audit["detail"] == {
        "targets": [{"model": DEFAULT_MODEL, "weight": 95}, {"model": "remote-ok", "weight": 5}],
        "fallbacks": ["remote-broken"], "shadow": None}
    assert api(stack).delete(f"/admin/routes/{name}").status_code == 200


def test_a_route_is_answered_by_its_target_until_it_is_deleted(stack, unique):
    name = unique("to-remote")
    assert put(stack, name, {"targets": [{"model": "remote-ok"}], "fallbacks": [DEFAULT_MODEL]}).status_code == 200
    assert until(lambda: name in model_ids(stack))
    answer = api(stack).post("/v1/chat/completions", json={"model": name, "messages": [QUESTION]})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-appliance-model"] == "remote-ok"
    assert answer.json()["echo"]["model"] == "upstream-model"  # forwarded as remote-ok's upstream names it

    deleted = api(stack).delete(f"/admin/routes/{name}")
    assert deleted.status_code == 200 and deleted.json() == {"name": name, "deleted": True, "serving": None}
    assert api(stack).get(f"/admin/routes/{name}").status_code == 404
    assert api(stack).delete(f"/admin/routes/{name}").status_code == 404
    assert until(lambda: name not in model_ids(stack)), f"{name} still in /v1/models"
    gone = api(stack).post("/v1/chat/completions", json={"model": name, "messages": [QUESTION]})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert [e["outcome"] for e in audited(stack, "route.delete", name)] == [f"refused: no route named {name!r}", "ok"]
    assert audited(stack, "route.set", name)[0]["detail"] == {"targets": [{"model": "remote-ok", "weight": 1}],
                                                               "fallbacks": [DEFAULT_MODEL], "shadow": None}


@pytest.mark.parametrize(("path_name", "body", "param"), [
    (None, {"targets": [{"model": "no-such-model"}]}, "targets[0].model"),
    (None, {"targets": [{"model": "remote-ok"}], "fallbacks": ["no-such-model"]}, "fallbacks[0]"),
    (None, {"targets": [{"model": "remote-ok", "weight": 0}, {"model": DEFAULT_MODEL, "weight": 0}]}, "targets"),
    (None, {"targets": [{"model": "remote-ok"}, {"model": "remote-ok"}]}, "targets[1].model"),
    (None, {"targets": [{"model": "remote-ok"}], "fallbacks": ["remote-ok"]}, "fallbacks[0]"),
    (None, {"targets": [{"model": "remote-ok"}], "weights": [1]}, "weights"),
    (None, {"targets": [{"model": "remote-ok", "weight": -1}]}, "targets[0].weight"),
    (None, {"targets": [{"model": "remote-ok", "weight": 1_000_001}]}, "targets[0].weight"),
    (None, {"targets": []}, "targets"),
    (None, {"targets": [{"model": f"m{i}"} for i in range(17)]}, "targets"),
    (None, {"targets": [{"model": "remote-ok"}], "fallbacks": [f"m{i}" for i in range(9)]}, "fallbacks"),
    ("-starts-with-a-dash", {"targets": [{"model": "remote-ok"}]}, "name"),
])
def test_bad_input_is_a_400_naming_the_field(stack, unique, path_name, body, param):
    name = path_name or unique("bad")
    response = put(stack, name, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert api(stack).get(f"/admin/routes/{name}").status_code == 404  # nothing stored


def test_a_viewer_may_read_routes_but_not_change_them(stack, unique):
    viewer = api(stack).post("/admin/keys", json={"name": unique("viewer"), "role": "viewer"}).json()["key"]
    assert until(lambda: api(stack, viewer).get("/admin/routes").status_code == 200), "the viewer key was not loaded"
    name = unique("not-yours")
    refused = put(stack, name, {"targets": [{"model": "remote-ok"}]}, key=viewer)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_role"
    assert "'routes.write'" in refused.json()["error"]["message"]
    assert api(stack).get(f"/admin/routes/{name}").status_code == 404


def test_the_cli_sets_lists_shows_and_deletes_a_route(stack, unique):
    name = unique("cli-route")
    client = ("--url", stack.root, "--key", stack.admin_key)
    out = appliance("routes", "set", name, "--target", "remote-ok=3", "--target", DEFAULT_MODEL,
                    "--fallback", "remote-broken", "--fallback", "remote-down", *client).stdout
    assert f"set route {name}: remote-ok 75% / {DEFAULT_MODEL} 25%; fallbacks: remote-broken, remote-down" in out
    [row] = [line for line in appliance("routes", "list", *client).stdout.splitlines() if line.startswith(name)]
    assert row.split() == [name, "remote-ok", "75%", "/", DEFAULT_MODEL, "25%",
                           "remote-broken,", "remote-down", "admin"]
    listed = json.loads(appliance("routes", "list", "--json", *client).stdout)
    assert [r["fallbacks"] for r in listed if r["name"] == name] == [["remote-broken", "remote-down"]]

    shown = until(lambda: "ready" in (text := appliance("routes", "show", name, *client).stdout) and text)
    lines = [line.split() for line in shown.splitlines()]
    assert lines[0][:2] == [name, "(admin,"]
    assert ["target", "remote-ok", "3", "75%", "ready"] in lines
    assert ["target", DEFAULT_MODEL, "1", "25%", "ready"] in lines
    assert ["fallback", "2", "remote-down", "-", "-", "unavailable"] in lines

    refused = appliance("routes", "set", name, "--target", "no-such-model", *client, check=False)
    assert refused.returncode == 1 and "parameter targets[0].model" in refused.stderr
    usage = appliance("routes", "set", name, "--target", "a=x", *client, check=False)
    assert usage.returncode == 2 and "'--target'" in usage.stderr and "'a=x'" in usage.stderr

    assert f"deleted route {name}" in appliance("routes", "delete", name, *client).stdout
    missing = appliance("routes", "show", name, *client, check=False)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
