"""Who may do what: the permission matrix of the admin API, as data.

Each /admin route (method and path template, as the router names it) needs one permission;
each permission is held by the roles listed for it. A route missing from ROUTES is refused
to everyone (fail closed), and tests/gateway/test_roles.py fails until it is added here
and to docs/governance.md, which shows this table. What a handler further limits to the
caller's own things (a developer's own keys) is the handler's part.
"""

from __future__ import annotations

from appliance.errors import PermissionDenied
from appliance.users import ROLES as STAFF_ROLES  # highest first; the metrics role has no /admin permission


def at_least(role: str) -> tuple[str, ...]:
    """`role` and every role above it."""
    return STAFF_ROLES[: STAFF_ROLES.index(role) + 1]


PERMISSIONS: dict[str, tuple[str, ...]] = {
    "keys.read": at_least("viewer"),  # non-managers see their own keys only
    "keys.write": at_least("developer"),  # create and revoke keys of one's role or below; non-managers their own
    "keys.update": at_least("operator"),  # change a key's limits and policy
    "models.read": at_least("viewer"),
    "models.write": at_least("developer"),  # register and upload versions, edit model cards
    "models.delete": at_least("operator"),
    "deployments.read": at_least("viewer"),
    "deployments.write": at_least("operator"),  # deploy and undeploy: engines take GPUs and memory
    "routes.read": at_least("viewer"),
    "routes.write": at_least("operator"),  # canary weights and fallbacks change what every caller is served
    "datasets.read": at_least("viewer"),  # names, versions, schema, quality and PII reports
    "datasets.content": at_least("developer"),  # the rows themselves: files, split parts, diffs
    "datasets.write": at_least("developer"),  # register, upload, mask, split
    "datasets.delete": at_least("operator"),
    "uploads.write": at_least("developer"),  # staged uploads for model and dataset versions
    "jobs.read": at_least("viewer"),
    "jobs.write": at_least("developer"),  # submit and cancel fine-tuning and evaluation jobs
    "experiments.read": at_least("developer"),  # runs: their params, metrics, environment; compare, export
    "experiments.write": at_least("developer"),  # tag runs
    "prompts.read": at_least("viewer"),  # prompt templates, their versions and A/B weights
    "prompts.write": at_least("developer"),  # new versions, A/B weights, delete
    "tools.read": at_least("developer"),  # the tools the gateway runs for models, and how
    "tools.run": at_least("developer"),  # run one by hand (POST /admin/tools/{name}/call)
    "tools.write": at_least("admin"),  # register commands the gateway's machine runs (sandboxed), MCP servers
    # Read any file the gateway's machine lets the appliance read: registering by `path`
    # (POST .../versions) and import jobs. Below operator, files come as uploads.
    "files.server": at_least("operator"),
    "users.read": at_least("operator"),
    "users.write": at_least("admin"),  # users, their roles, passwords and teams
    "teams.read": at_least("operator"),
    "teams.write": at_least("admin"),  # teams, their members, limits and policies
    "usage.read": at_least("viewer"),  # tokens and cost; non-managers see their own
    "audit.read": at_least("operator"),  # the log and its verification
    "alerts.read": at_least("viewer"),  # alerts raised, and the rules in force
    "alerts.write": at_least("operator"),  # set and delete rules
    "alerts.channels": at_least("admin"),  # webhook URLs and mail servers: read, set, delete, test
    "request_logs.read": at_least("operator"),  # the requests and answers kept (masked); reading one is audited
    "audit.export": at_least("admin"),  # every row, for a SIEM
}

ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/admin/keys"): "keys.read",
    ("POST", "/admin/keys"): "keys.write",
    ("GET", "/admin/keys/{key_id}"): "keys.read",
    ("PATCH", "/admin/keys/{key_id}"): "keys.update",
    ("POST", "/admin/keys/{key_id}/revoke"): "keys.write",
    ("GET", "/admin/models"): "models.read",
    ("GET", "/admin/models/{name}"): "models.read",
    ("GET", "/admin/models/{name}/compare"): "models.read",
    ("GET", "/admin/models/{name}/versions/{version}"): "models.read",
    ("POST", "/admin/models/{name}/versions"): "models.write",
    ("POST", "/admin/models/{name}/upload"): "models.write",
    ("PATCH", "/admin/models/{name}/versions/{version}/card"): "models.write",
    ("DELETE", "/admin/models/{name}/versions/{version}"): "models.delete",
    ("GET", "/admin/models/{name}/gate"): "models.read",
    ("PUT", "/admin/models/{name}/gate"): "models.write",
    ("DELETE", "/admin/models/{name}/gate"): "models.write",
    ("POST", "/admin/models/{name}/versions/{version}/gate"): "models.write",
    ("GET", "/admin/deployments"): "deployments.read",
    ("GET", "/admin/deployments/{name}"): "deployments.read",
    ("POST", "/admin/deployments"): "deployments.write",
    ("DELETE", "/admin/deployments/{name}"): "deployments.write",
    ("GET", "/admin/routes"): "routes.read",
    ("GET", "/admin/routes/{name}"): "routes.read",
    ("GET", "/admin/serving"): "routes.read",
    ("GET", "/admin/system"): "routes.read",
    ("GET", "/admin/alerts"): "alerts.read",
    ("GET", "/admin/alerts/rules"): "alerts.read",
    ("PUT", "/admin/alerts/rules/{name}"): "alerts.write",
    ("DELETE", "/admin/alerts/rules/{name}"): "alerts.write",
    ("GET", "/admin/alerts/channels"): "alerts.channels",
    ("PUT", "/admin/alerts/channels/{name}"): "alerts.channels",
    ("DELETE", "/admin/alerts/channels/{name}"): "alerts.channels",
    ("POST", "/admin/alerts/channels/{name}/test"): "alerts.channels",
    ("GET", "/admin/request-logs"): "request_logs.read",
    ("GET", "/admin/request-logs/{request_id}"): "request_logs.read",
    ("PUT", "/admin/routes/{name}"): "routes.write",
    ("DELETE", "/admin/routes/{name}"): "routes.write",
    ("GET", "/admin/datasets"): "datasets.read",
    ("GET", "/admin/datasets/{name}"): "datasets.read",
    ("GET", "/admin/datasets/{name}/versions/{version}"): "datasets.read",
    ("GET", "/admin/datasets/{name}/diff"): "datasets.content",
    ("GET", "/admin/datasets/{name}/versions/{version}/file"): "datasets.content",
    ("GET", "/admin/datasets/{name}/versions/{version}/splits/{split_id}/{part}"): "datasets.content",
    ("POST", "/admin/datasets/{name}/versions"): "datasets.write",
    ("POST", "/admin/datasets/{name}/upload"): "datasets.write",
    ("POST", "/admin/datasets/{name}/versions/{version}/mask"): "datasets.write",
    ("POST", "/admin/datasets/{name}/versions/{version}/split"): "datasets.write",
    ("DELETE", "/admin/datasets/{name}/versions/{version}"): "datasets.delete",
    ("POST", "/admin/uploads"): "uploads.write",
    ("GET", "/admin/jobs"): "jobs.read",
    ("GET", "/admin/jobs/{job_id}"): "jobs.read",
    ("GET", "/admin/jobs/{job_id}/log"): "jobs.read",
    ("GET", "/admin/jobs/{job_id}/events"): "jobs.read",
    ("POST", "/admin/jobs"): "jobs.write",
    ("POST", "/admin/jobs/{job_id}/cancel"): "jobs.write",
    ("GET", "/admin/experiments"): "experiments.read",
    ("GET", "/admin/runs"): "experiments.read",
    ("GET", "/admin/runs/compare"): "experiments.read",
    ("GET", "/admin/runs/export"): "experiments.read",
    ("GET", "/admin/runs/{run_id}"): "experiments.read",
    ("GET", "/admin/runs/{run_id}/metrics"): "experiments.read",
    ("GET", "/admin/runs/{run_id}/samples"): "experiments.read",
    ("GET", "/admin/evaluations/compare"): "experiments.read",
    ("GET", "/admin/prompts"): "prompts.read",
    ("GET", "/admin/prompts/{name}"): "prompts.read",
    ("GET", "/admin/prompts/{name}/versions/{version}"): "prompts.read",
    ("POST", "/admin/prompts/{name}/versions"): "prompts.write",
    ("PUT", "/admin/prompts/{name}/ab"): "prompts.write",
    ("POST", "/admin/prompts/{name}/render"): "prompts.read",
    ("DELETE", "/admin/prompts/{name}"): "prompts.write",
    ("GET", "/admin/tools"): "tools.read",
    ("GET", "/admin/tools/{name}"): "tools.read",
    ("POST", "/admin/tools/{name}"): "tools.write",
    ("PUT", "/admin/tools/{name}"): "tools.write",
    ("DELETE", "/admin/tools/{name}"): "tools.write",
    ("POST", "/admin/tools/{name}/call"): "tools.run",
    ("PATCH", "/admin/runs/{run_id}"): "experiments.write",
    ("GET", "/admin/users"): "users.read",
    ("GET", "/admin/users/{name}"): "users.read",
    ("POST", "/admin/users"): "users.write",
    ("PATCH", "/admin/users/{name}"): "users.write",
    ("POST", "/admin/users/{name}/password"): "users.write",
    ("DELETE", "/admin/users/{name}"): "users.write",
    ("GET", "/admin/teams"): "teams.read",
    ("GET", "/admin/teams/{name}"): "teams.read",
    ("POST", "/admin/teams"): "teams.write",
    ("PATCH", "/admin/teams/{name}"): "teams.write",
    ("DELETE", "/admin/teams/{name}"): "teams.write",
    ("POST", "/admin/teams/{name}/members"): "teams.write",
    ("DELETE", "/admin/teams/{name}/members/{user}"): "teams.write",
    ("GET", "/admin/usage"): "usage.read",
    ("GET", "/admin/audit"): "audit.read",
    ("GET", "/admin/audit/verify"): "audit.read",
    ("GET", "/admin/audit/export"): "audit.export",
}


def require(role: str, permission: str, *, param: str | None = None) -> None:
    """403 unless `role` holds `permission`: for what a handler checks beyond its route's."""
    if role not in PERMISSIONS[permission]:
        raise PermissionDenied(f"this needs the permission {permission!r}, held by "
                               f"{', '.join(PERMISSIONS[permission])}; this caller's role is {role!r}.", param=param)


def permission_for(method: str, path_template: str) -> str | None:
    return ROUTES.get((method, path_template))


def allowed(role: str, method: str, path_template: str) -> bool:
    permission = permission_for(method, path_template)
    return permission is not None and role in PERMISSIONS[permission]


def check(role: str, method: str, path_template: str) -> None:
    """403 unless `role` holds the permission of the route (none: refused to everyone)."""
    permission = permission_for(method, path_template)
    if permission is None:
        raise PermissionDenied(f"{method} {path_template} is in no permission of the role matrix "
                               "(appliance/permissions.py), so it is refused to every role.")
    holders = PERMISSIONS[permission]
    if role not in holders:
        raise PermissionDenied(f"{method} {path_template} needs the permission {permission!r}, held by "
                               f"{', '.join(holders)}; this caller's role is {role!r}.")
