"""Routes: a name clients ask for, served by weighted targets (a canary: 95/5 between two
versions) with fallbacks tried in order when the chosen target fails before its answer
starts. The gateway follows them within a second (services/gateway/routing.py).

A profile's `routes:` are the defaults; a route set through /admin/routes is stored in the
state database and replaces the profile's route of the same name until it is deleted, when
the profile's comes back. Targets and fallbacks name served models: profile models,
deployments, or registry versions NAME@VERSION (whichever deployment serves that version).
"""

from __future__ import annotations

import time

import msgspec
import sqlite_utils

from appliance.config import RouteSpec, check_route
from appliance.db import transaction
from appliance.errors import Conflict, InvalidRequest, NotFound

PROFILE, ADMIN = "profile", "admin"


def validate(spec: RouteSpec, served: set[str]) -> None:
    """400 naming the field: no weight, a model named twice, or one that is not served."""
    try:
        check_route(spec, "route")
    except ValueError as exc:
        field = str(exc).split(":", 1)[0].removeprefix("route.")
        raise InvalidRequest(str(exc).removeprefix("route."), param=field) from None
    named = [(f"targets[{i}].model", t.model) for i, t in enumerate(spec.targets)]
    named += [(f"fallbacks[{i}]", m) for i, m in enumerate(spec.fallbacks)]
    if spec.shadow is not None:
        named.append(("shadow.model", spec.shadow.model))
    for field, model in named:
        if model not in served:
            raise InvalidRequest(f"{field}: {model!r} is not a served model (a profile model, a deployment, or a "
                                 "registry version NAME@VERSION that a deployment serves); "
                                 f"served now: {', '.join(sorted(served)) or 'none'}", param=field)


def stored(db: sqlite_utils.Database) -> dict[str, RouteSpec]:
    """The routes set through /admin, by name."""
    return {row["name"]: msgspec.json.decode(row["spec"], type=RouteSpec)
            for row in db.query("SELECT name, spec FROM routes")}


def effective(profile_routes: list[RouteSpec], admin_routes: dict[str, RouteSpec]) -> dict[str, RouteSpec]:
    """What the gateway serves: the profile's routes, each replaced by an admin route of its name."""
    return {**{r.name: r for r in profile_routes}, **admin_routes}


def put(db: sqlite_utils.Database, spec: RouteSpec, *, served: set[str], by: str | None,
        profile_routes: list[RouteSpec]) -> dict:
    """Create or replace the admin route `spec.name`."""
    validate(spec, served)
    now = time.time()
    with transaction(db):
        db.execute(
            """INSERT INTO routes (name, spec, created_at, created_by, updated_at, updated_by)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at,
                                                updated_by = excluded.updated_by""",
            [spec.name, msgspec.json.encode(spec).decode(), now, by, now, by])
    return get(db, spec.name, profile_routes)


def delete(db: sqlite_utils.Database, name: str, profile_routes: list[RouteSpec]) -> dict:
    """Delete the admin route `name`; the profile's route of that name, if any, is served again."""
    with transaction(db):
        if db.execute("DELETE FROM routes WHERE name = ?", [name]).rowcount == 0:
            if any(r.name == name for r in profile_routes):
                raise Conflict(f"the route {name!r} is the profile's: change it in the profile, or replace it "
                               "with PUT /admin/routes/{name}", param="name")
            raise NotFound(f"no route named {name!r}", param="name")
    restored = next((r for r in profile_routes if r.name == name), None)
    return {"name": name, "deleted": True, "serving": describe(restored, PROFILE) if restored else None}


def shares(spec: RouteSpec) -> list[float]:
    """Each target's share of the route's requests, in percent."""
    total = sum(t.weight for t in spec.targets)
    return [round(100 * t.weight / total, 2) for t in spec.targets]


def describe(spec: RouteSpec, source: str, row: dict | None = None) -> dict:
    """A route as the admin API shows it: its targets' shares in percent, and where it comes from."""
    out = {
        "name": spec.name,
        "targets": [{"model": t.model, "weight": t.weight, "share": share}
                    for t, share in zip(spec.targets, shares(spec))],
        "fallbacks": list(spec.fallbacks),
        "shadow": msgspec.to_builtins(spec.shadow),
        "source": source,
    }
    if row is not None:
        out |= {k: row[k] for k in ("created_at", "created_by", "updated_at", "updated_by")}
    return out


def get(db: sqlite_utils.Database, name: str, profile_routes: list[RouteSpec]) -> dict:
    rows = list(db.query("SELECT * FROM routes WHERE name = ?", [name]))
    if rows:
        out = describe(msgspec.json.decode(rows[0]["spec"], type=RouteSpec), ADMIN, rows[0])
        out["replaces_profile_route"] = any(r.name == name for r in profile_routes)
        return out
    for route in profile_routes:
        if route.name == name:
            return describe(route, PROFILE)
    raise NotFound(f"no route named {name!r}", param="name")


def list_all(db: sqlite_utils.Database, profile_routes: list[RouteSpec]) -> list[dict]:
    names = {r.name for r in profile_routes} | {row["name"] for row in db.query("SELECT name FROM routes")}
    return [get(db, name, profile_routes) for name in sorted(names)]


SHADOW_COLUMNS = ("ts", "route", "request_id", "primary_model", "shadow_model", "primary_ms", "shadow_ms",
                  "primary_tokens", "shadow_tokens", "status", "error", "similarity")


def record_shadow(db: sqlite_utils.Database, rows: list[tuple]) -> None:
    """Shadow results (tuples in SHADOW_COLUMNS order), as the gateway batches them."""
    with transaction(db):
        db.conn.executemany(f"INSERT INTO shadow_results ({', '.join(SHADOW_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(SHADOW_COLUMNS))})", rows)


def shadow_summary(db: sqlite_utils.Database, name: str, since: float) -> list[dict]:
    """A route's shadow traffic since `since`, per pair of models: how many, how often the shadow
    failed, how alike the answers were (0 to 1) and what each took."""
    return list(db.query(
        """SELECT primary_model, shadow_model, count(*) AS requests, sum(status != 200) AS shadow_errors,
                  round(avg(similarity), 3) AS similarity, round(avg(primary_ms), 1) AS primary_ms,
                  round(avg(shadow_ms), 1) AS shadow_ms, round(avg(primary_tokens), 1) AS primary_tokens,
                  round(avg(shadow_tokens), 1) AS shadow_tokens, max(ts) AS last_ts
           FROM shadow_results WHERE route = ? AND ts >= ? GROUP BY primary_model, shadow_model
           ORDER BY requests DESC""", [name, since]))
