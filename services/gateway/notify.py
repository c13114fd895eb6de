"""Sending an alert to a channel: a webhook (Slack's incoming-webhook payload, or the alert as
JSON) or an email over SMTP. A failure is a DeliveryFailed that says what the server answered."""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
import time
from email.message import EmailMessage

import httpx

from appliance.config import AlertChannelSpec, EmailChannel, WebhookChannel
from appliance.errors import DeliveryFailed

TIMEOUT_S = 10.0
COLORS = {"firing": {"critical": "#d0021b", "warning": "#f5a623", "info": "#4a90e2"}, "resolved": "#2eb886",
          "test": "#9b9b9b"}


def headline(alert: dict, event: str) -> str:
    """[FIRING] engine-crash-loop (critical): smollm2: 3 engine restarts in 10m"""
    if event == "test":
        return f"[TEST] a test message from the appliance to alert channel {alert['channel']!r}"
    return f"[{event.upper()}] {alert['rule']} ({alert['severity']}): {alert['summary']}"


def details(alert: dict) -> list[tuple[str, str]]:
    if "rule" not in alert:
        return []
    moments = [("started", alert["started_at"]), ("fired", alert.get("fired_at")), ("resolved", alert.get("resolved_at"))]
    return [("rule", f"{alert['rule']} ({alert['kind']})"), *((k, str(v)) for k, v in alert["labels"].items()),
            ("value", f"{alert['value']:g}"), ("threshold", f"{alert['threshold']:g}"),
            *((what, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))) for what, at in moments if at)]


def slack_payload(alert: dict, event: str) -> dict:
    color = COLORS[event][alert["severity"]] if event == "firing" else COLORS[event]
    return {"text": headline(alert, event),
            "attachments": [{"color": color, "fields": [{"title": k, "value": v, "short": True}
                                                        for k, v in details(alert)]}]}


async def _post(webhook: WebhookChannel, alert: dict, event: str) -> None:
    body = slack_payload(alert, event) if webhook.format == "slack" else {"event": event, "alert": alert}
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            answer = await client.post(webhook.url, json=body)
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"the webhook {webhook.url} could not be reached: {str(exc) or type(exc).__name__}") from None
    if not answer.is_success:
        raise DeliveryFailed(f"the webhook {webhook.url} answered {answer.status_code}: {answer.text[:200]}")


def _send_mail(email: EmailChannel, alert: dict, event: str) -> None:
    message = EmailMessage()
    message["Subject"] = headline(alert, event)
    message["From"], message["To"] = email.sender, ", ".join(email.to)
    message.set_content("\n".join([headline(alert, event), "", *(f"{k}: {v}" for k, v in details(alert))]) + "\n")
    password = os.environ.get(email.password_env) if email.password_env else None
    if email.password_env and password is None:
        raise DeliveryFailed(f"the SMTP password's variable {email.password_env} is not set")
    try:
        smtp_class = smtplib.SMTP_SSL if email.security == "tls" else smtplib.SMTP
        with smtp_class(email.host, email.port, timeout=TIMEOUT_S) as smtp:
            if email.security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if email.username:
                smtp.login(email.username, password or "")
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryFailed(f"the SMTP server {email.host}:{email.port} did not take the message: {exc}") from None


async def deliver(channel: AlertChannelSpec, alert: dict, event: str) -> None:
    """Send `alert` (firing, resolved, or a test) to `channel`; DeliveryFailed if it was not taken."""
    if channel.webhook is not None:
        await _post(channel.webhook, alert, event)
    else:
        await asyncio.to_thread(_send_mail, channel.email, alert, event)
