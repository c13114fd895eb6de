"""The role matrix on the real stack (the governance stack of tests/gateway/conftest.py): every
/admin route the app has (enumerated from it, not listed here), called with a key of every
role and with none, is refused exactly where appliance/permissions.py says and let through
everywhere else. A route the matrix does not name fails here (and is refused to everyone)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from appliance import permissions
from appliance.config import GatewayConfig
from appliance.errors import PermissionDenied
from services.gateway.app import litestar_app
from tests.gateway.test_admin_keys import create, wait_status

pytestmark = pytest.mark.stack

ROLES = ("admin", "operator", "developer", "viewer", "metrics")
# Path parameters that name nothing, and no body: an allowed call gets a 4xx from its handler, never a change.
PLACEHOLDERS = {"version": "1"}


def admin_routes() -> list[tuple[str, str]]:
    """(method, path template) of every /admin route of the app the gateway serves."""
    app = litestar_app(GatewayConfig())
    return sorted({(method, route.path_format) for route in app.routes if route.path_format.startswith("/admin/")
                   or route.path_format == "/admin" for method in getattr(route, "methods", ()) if method != "OPTIONS"})


def concrete(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PLACEHOLDERS.get(m.group(1), f"no-such-{m.group(1)}"), template)


def test_every_admin_route_is_in_the_matrix_and_the_matrix_names_only_real_routes():
    routes = set(admin_routes())
    assert routes - set(permissions.ROUTES) == set(), "add these routes to appliance/permissions.py ROUTES"
    assert set(permissions.ROUTES) - routes == set(), "appliance/permissions.py names routes the app does not have"
    assert set(permissions.ROUTES.values()) <= set(permissions.PERMISSIONS)


def test_a_route_outside_the_matrix_is_refused_even_to_an_admin():
    with pytest.raises(PermissionDenied, match="refused to every role"):
        permissions.check("admin", "POST", "/admin/something-new")
    assert not permissions.allowed("admin", "GET", "/admin/something-new")


def matrix_markdown() -> str:
    """The matrix as docs/governance.md shows it."""
    lines = ["| permission | admin | operator | developer | viewer | routes |", "| --- | --- | --- | --- | --- | --- |"]
    for permission, holders in permissions.PERMISSIONS.items():
        marks = " | ".join("yes" if role in holders else "-" for role in permissions.STAFF_ROLES)
        routes = ", ".join(f"`{m} {t}`" for (m, t), needed in permissions.ROUTES.items() if needed == permission)
        lines.append(f"| `{permission}` | {marks} | {routes} |")
    return "\n".join(lines) + "\n"


def test_docs_show_the_matrix_as_it_is():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "governance.md").read_text()
    assert matrix_markdown() in docs, "docs/governance.md: update the matrix table from appliance/permissions.py"


def test_the_matrix_follows_the_role_order():
    """What a role may do, every role above it may do too; the metrics role does nothing in /admin."""
    for permission, holders in permissions.PERMISSIONS.items():
        assert "admin" in holders, permission
        assert holders == permissions.STAFF_ROLES[:len(holders)], permission


@pytest.fixture(scope="module")
def stack(governance_stack):
    return governance_stack


@pytest.fixture(scope="module")
def role_keys(stack) -> dict[str, str]:
    made = {role: create(stack, f"{role} key", role=role)["key"] for role in ROLES if role != "admin"}
    for role, key in made.items():  # the gateway has loaded every one (a metrics key may not read /v1)
        expected = 403 if role == "metrics" else 200
        assert wait_status(stack, key, expected).status_code == expected, role
    return {"admin": stack.admin_key, **made}


def call(http: httpx.Client, method: str, template: str, key: str | None) -> httpx.Response:
    """The answer's status, and its body only when it is an error (a success may be a download or a stream)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with http.stream(method, concrete(template), headers=headers) as response:
        if response.status_code >= 400:
            response.read()
    return response


def refused_by_the_guard(response: httpx.Response) -> bool:
    """A 403 of the permission guard (a handler's own 403, say for a role above the caller's, is not)."""
    return response.status_code == 403 and "needs the permission" in response.json()["error"]["message"]


def test_every_route_with_every_role_is_refused_exactly_where_the_matrix_says(stack, role_keys):
    wrong = []
    with httpx.Client(base_url=stack.root, timeout=30) as http:
        for method, template in admin_routes():
            permission = permissions.permission_for(method, template)
            for role, key in role_keys.items():
                response = call(http, method, template, key)
                if role == "metrics":
                    ok = response.status_code == 403
                elif role in permissions.PERMISSIONS.get(permission, ()):
                    ok = response.status_code not in (401, 500) and not refused_by_the_guard(response)
                else:
                    ok = refused_by_the_guard(response) and repr(role) in response.json()["error"]["message"]
                if not ok:
                    wrong.append(f"{role} {method} {template} ({permission}): {response.status_code} {response.text[:200]}")
            anonymous = call(http, method, template, None)
            if anonymous.status_code != 401:
                wrong.append(f"no key {method} {template}: {anonymous.status_code}")
    assert not wrong, "\n".join(wrong)


def test_a_refusal_names_the_permission_and_the_role(stack, role_keys):
    response = httpx.post(f"{stack.root}/admin/deployments", json={},
                          headers={"Authorization": f"Bearer {role_keys['developer']}"}, timeout=30)
    error = response.json()["error"]
    assert response.status_code == 403 and error["code"] == "insufficient_role"
    assert "'deployments.write'" in error["message"] and "'developer'" in error["message"]
