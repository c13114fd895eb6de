"""`appliance alerts ...`: a client of /admin/alerts (docs/observability.md#alerts)."""

from __future__ import annotations

import click

from appliance.admin_client import make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import client_options, json_option
from appliance.config import AlertKind

KINDS = AlertKind.__args__


@click.group()
def alerts() -> None:
    """Alerts: rules the appliance evaluates itself (error rate, latency, token surges, GPU
    memory and temperature, engine crash loops, budgets) and the channels they go to (a
    webhook, such as Slack's, or email)."""


@alerts.command("list")
@click.option("--state", type=click.Choice(["pending", "firing", "resolved"]), help="Only alerts in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@client_options
@json_option()
def alerts_list(state, limit, url, key, home, as_json):
    """List alerts, newest first, with each channel's delivery."""
    rows = make_client(url, key, home).get("/admin/alerts", state=state, limit=limit)

    def sent(alert: dict) -> str:
        return ", ".join(f"{name} {d['event']} {'ok' if not d['error'] else 'FAILED'}"
                         for name, d in alert["deliveries"].items()) or "-"

    emit(rows, as_json, lambda rs: table(
        [{**a, "started": when(a["started_at"]), "resolved": when(a["resolved_at"]), "sent": sent(a)} for a in rs],
        ["id", "state", "severity", "rule", "summary", "started", "resolved", "sent"]))


@alerts.command("rules")
@client_options
@json_option()
def alerts_rules(url, key, home, as_json):
    """List the rules in force, with ORIGIN: default (built in), profile, or api (`alerts rule set`)."""
    rows = make_client(url, key, home).get("/admin/alerts/rules")
    emit(rows, as_json, lambda rs: table(
        [{**r, "threshold": f"{r['threshold']:g} {r['unit']}", "window": f"{r['window_s']:g} s" if r["window_s"] else None,
          "for": f"{r['for_s']:g} s", "channels": ", ".join(r["channels"]) or "all", "enabled": "yes" if r["enabled"] else "no"}
         for r in rs],
        ["name", "kind", "threshold", "window", "for", "severity", "model", "channels", "enabled", "origin"]))


@alerts.group("rule")
def alerts_rule() -> None:
    """Set or delete a rule (it replaces the profile's or the built-in rule of its name)."""


@alerts_rule.command("set")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS), required=True, help="What the rule measures (docs/observability.md).")
@click.option("--threshold", type=float, help="Above it the condition holds. Default: the kind's.")
@click.option("--window", "window_s", type=float, help="Seconds a rate or an increase is measured over. Default: the kind's.")
@click.option("--for", "for_s", type=float, default=0.0, show_default=True,
              help="Seconds the condition must hold before the alert fires.")
@click.option("--severity", type=click.Choice(["info", "warning", "critical"]), default="warning", show_default=True)
@click.option("--channel", "channels", multiple=True, help="A channel to send to; repeat. Default: every channel.")
@click.option("--model", help="Only this model (error_rate, latency, token_surge, engine_crash_loop).")
@click.option("--disable", is_flag=True, help="Keep the rule but do not evaluate it (turns off a built-in rule).")
@client_options
@json_option()
def alerts_rule_set(name, kind, threshold, window_s, for_s, severity, channels, model, disable, url, key, home, as_json):
    """Create or replace the alert rule NAME."""
    body = {"kind": kind, "threshold": threshold, "window_s": window_s, "for_s": for_s, "severity": severity,
            "channels": list(channels), "model": model, "enabled": not disable}
    rule = make_client(url, key, home).request("PUT", f"/admin/alerts/rules/{name}",
                                               json={k: v for k, v in body.items() if v is not None})
    emit(rule, as_json, lambda r: f"set alert rule {r['name']}: {r['kind']} above {r['threshold']:g} {r['unit']}"
                                  + ("" if r["enabled"] else " (disabled)"))


@alerts_rule.command("delete")
@click.argument("name")
@client_options
def alerts_rule_delete(name, url, key, home):
    """Delete the rule NAME set with `rule set`: the profile's or built-in rule of its name is in force again."""
    make_client(url, key, home).request("DELETE", f"/admin/alerts/rules/{name}")
    click.echo(f"deleted alert rule {name}")


@alerts.command("channels")
@client_options
@json_option()
def alerts_channels(url, key, home, as_json):
    """List the channels in force, with ORIGIN: profile or api (`alerts channel set`)."""
    rows = make_client(url, key, home).get("/admin/alerts/channels")

    def where(c: dict) -> str:
        if c.get("webhook"):
            return f"webhook {c['webhook']['url']} ({c['webhook'].get('format', 'slack')})"
        email = c["email"]
        return f"email to {', '.join(email['to'])} via {email['host']}:{email.get('port', 25)}"

    emit(rows, as_json, lambda rs: table([{**c, "sends": where(c)} for c in rs], ["name", "sends", "origin"]))


@alerts.group("channel")
def alerts_channel() -> None:
    """Set, delete or test a channel."""


@alerts_channel.command("set")
@click.argument("name")
@click.option("--webhook", "webhook_url", metavar="URL", help="POST alerts to this URL.")
@click.option("--format", "webhook_format", type=click.Choice(["slack", "json"]), default="slack", show_default=True,
              help="The webhook's payload: Slack's incoming-webhook message, or the alert as JSON.")
@click.option("--email-to", "to", multiple=True, metavar="ADDRESS", help="Mail alerts to this address; repeat.")
@click.option("--smtp-host", help="The SMTP server (with --email-to).")
@click.option("--smtp-port", type=click.IntRange(1, 65535), default=25, show_default=True)
@click.option("--sender", metavar="ADDRESS", help="The From address (with --email-to).")
@click.option("--security", type=click.Choice(["none", "starttls", "tls"]), default="none", show_default=True)
@click.option("--username", help="Sign in to the SMTP server as this user.")
@click.option("--password-env", metavar="VARIABLE",
              help="The environment variable of the gateway that holds the SMTP password.")
@client_options
@json_option()
def alerts_channel_set(name, webhook_url, webhook_format, to, smtp_host, smtp_port, sender, security, username,
                       password_env, url, key, home, as_json):
    """Create or replace the channel NAME: a webhook (--webhook) or email (--email-to, --smtp-host, --sender)."""
    if bool(webhook_url) == bool(to):
        raise click.UsageError("give one of --webhook URL and --email-to ADDRESS (with --smtp-host and --sender)")
    if to and not (smtp_host and sender):
        raise click.UsageError("--email-to needs --smtp-host and --sender")
    if webhook_url:
        body = {"webhook": {"url": webhook_url, "format": webhook_format}}
    else:
        email = {"host": smtp_host, "port": smtp_port, "sender": sender, "to": list(to), "security": security,
                 "username": username, "password_env": password_env}
        body = {"email": {k: v for k, v in email.items() if v is not None}}
    channel = make_client(url, key, home).request("PUT", f"/admin/alerts/channels/{name}", json=body)
    emit(channel, as_json, lambda c: f"set alert channel {c['name']}")


@alerts_channel.command("delete")
@click.argument("name")
@client_options
def alerts_channel_delete(name, url, key, home):
    """Delete the channel NAME set with `channel set`."""
    make_client(url, key, home).request("DELETE", f"/admin/alerts/channels/{name}")
    click.echo(f"deleted alert channel {name}")


@alerts_channel.command("test")
@click.argument("name")
@client_options
def alerts_channel_test(name, url, key, home):
    """Send a test message to the channel NAME now (an error says what its server answered)."""
    make_client(url, key, home).post(f"/admin/alerts/channels/{name}/test")
    click.echo(f"sent a test message to {name}")
