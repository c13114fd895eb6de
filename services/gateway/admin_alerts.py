"""Alerts in the admin API: /admin/alerts (appliance/alerts.py, services/gateway/alerting.py).

The alerts raised (pending, firing, resolved) and what each channel answered; the rules and
channels in force, with where each comes from (default, profile or api). A rule or channel
set here replaces the profile's (or the built-in rule) of its name until it is deleted; the
alerter reads them at its next evaluation. POST .../channels/{name}/test sends a test message.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.params import Parameter

from appliance import alerts
from appliance.audit import Actor
from appliance.config import AlertChannelSpec, AlertRuleSpec
from appliance.errors import Conflict, NotFound, invalid_value
from services.gateway.admin import decoded, gateway_of, perform, request_body, run
from services.gateway.alerting import send_test


def _without_name(spec: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """`spec`'s fields but its name, which the path gives: a PUT's body."""
    fields = []
    for field in msgspec.structs.fields(spec):
        if field.name == "name":
            continue
        if field.default is not msgspec.NODEFAULT:
            fields.append((field.name, field.type, field.default))
        elif field.default_factory is not msgspec.NODEFAULT:
            fields.append((field.name, field.type, msgspec.field(default_factory=field.default_factory)))
        else:
            fields.append((field.name, field.type))
    return msgspec.defstruct(f"Set{spec.__name__.removesuffix('Spec')}", fields, kw_only=True,
                             forbid_unknown_fields=True)


SetAlertRule, SetAlertChannel = _without_name(AlertRuleSpec), _without_name(AlertChannelSpec)


def _named(name: str, body: msgspec.Struct, spec: type[msgspec.Struct]):
    try:
        return msgspec.convert(msgspec.to_builtins(body) | {"name": name}, spec)
    except msgspec.ValidationError as exc:
        raise invalid_value(exc) from None


class AlertController(Controller):
    path = "/alerts"
    tags = ["alerts"]

    @get()
    async def list_alerts(self, request: Request, actor: Actor,
                          alert_state: Literal["pending", "firing", "resolved"] | None = Parameter(query="state",
                                                                                                 default=None),
                          limit: Annotated[int, Parameter(ge=1, le=10_000)] = 100) -> Response:
        """Alerts, newest first (`state` to keep one state): the rule, its subject and labels, the value
        measured and the threshold, when it started, fired and resolved, and each channel's delivery."""
        return await run(request, actor, lambda db: alerts.list_alerts(db, state=alert_state, limit=limit))

    @get("/rules")
    async def list_rules(self, request: Request, actor: Actor) -> Response:
        """The rules in force: the built-in ones, the profile's and those set here (`origin`), with
        their thresholds and windows filled in."""
        config = gateway_of(request).runtime.alerts

        def work(db) -> list[dict]:
            found = alerts.origins(config, db, "alert_rules")
            return [alerts.describe_rule(rule, found[name]) for name, rule in alerts.effective_rules(config, db).items()]

        return await run(request, actor, work)

    @put("/rules/{name:str}", opt=request_body(SetAlertRule))
    async def set_rule(self, request: Request, actor: Actor, name: str) -> Response:
        """Create or replace the rule `name` (a built-in or the profile's of that name is replaced)."""
        rule = _named(name, await decoded(request), AlertRuleSpec)
        config = gateway_of(request).runtime.alerts
        return await run(request, actor, lambda db: alerts.describe_rule(alerts.store_rule(db, config, rule), "api"),
                         action="alert_rule.set", target=f"alert_rule/{name}", detail=lambda r: r)

    @delete("/rules/{name:str}", status_code=200)
    async def delete_rule(self, request: Request, actor: Actor, name: str) -> Response:
        """Delete the rule set here: the profile's (or the built-in one) of its name is in force again."""
        def work(db) -> dict:
            alerts.delete_stored(db, "alert_rules", name)
            return {"deleted": name}

        return await run(request, actor, work, action="alert_rule.delete", target=f"alert_rule/{name}")

    @get("/channels")
    async def list_channels(self, request: Request, actor: Actor) -> Response:
        """The channels in force (`origin`: profile or api); an email channel's password stays in its variable."""
        config = gateway_of(request).runtime.alerts

        def work(db) -> list[dict]:
            found = alerts.origins(config, db, "alert_channels")
            return [alerts.describe_channel(c, found[n]) for n, c in alerts.effective_channels(config, db).items()]

        return await run(request, actor, work)

    @put("/channels/{name:str}", opt=request_body(SetAlertChannel))
    async def set_channel(self, request: Request, actor: Actor, name: str) -> Response:
        """Create or replace the channel `name`: a `webhook` (url, format slack or json) or an `email`
        (SMTP host, port, sender, to, security, username, password_env)."""
        channel = _named(name, await decoded(request), AlertChannelSpec)
        return await run(request, actor, lambda db: alerts.describe_channel(alerts.store_channel(db, channel), "api"),
                         action="alert_channel.set", target=f"alert_channel/{name}", detail=lambda c: c)

    @delete("/channels/{name:str}", status_code=200)
    async def delete_channel(self, request: Request, actor: Actor, name: str) -> Response:
        """Delete the channel set here, unless a rule still names it and the profile has none of its name."""
        config = gateway_of(request).runtime.alerts

        def work(db) -> dict:
            if name not in {c.name for c in config.channels}:
                users = [r.name for r in alerts.effective_rules(config, db).values() if name in r.channels]
                if users:
                    raise Conflict(f"The alert rule(s) {', '.join(users)} send to channel {name!r}: change them first.",
                                   param="name")
            alerts.delete_stored(db, "alert_channels", name)
            return {"deleted": name}

        return await run(request, actor, work, action="alert_channel.delete", target=f"alert_channel/{name}")

    @post("/channels/{name:str}/test", status_code=200)
    async def test_channel(self, request: Request, actor: Actor, name: str) -> Response:
        """Send a test message to the channel now; 502 with what its server answered if it was not taken."""
        config = gateway_of(request).runtime.alerts
        channels = await perform(request, actor, lambda db: alerts.effective_channels(config, db))
        if name not in channels:
            raise NotFound(f"No alert channel named {name!r}.", param="name")
        await send_test(channels[name])
        return Response({"sent": name}, headers={"x-request-id": actor.request_id})
