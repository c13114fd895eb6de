"""Alerts end to end: an engine killed in a loop raises a crash-loop alert that arrives once by
webhook (Slack's payload) and by email (a real SMTP server), and a resolved message once the
engine has stayed up; a channel that refuses is recorded and retried. And the admin API's
rules and channels, with their errors."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, appliance, readiness

pytestmark = pytest.mark.stack


def api(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def kill_engine_and_wait_ready(stack) -> None:
    [pid] = stack.engine_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        engines = readiness(stack.root)["models"][DEFAULT_MODEL]["engines"]
        if stack.engine_pids() not in ([], [pid]) and engines[0]["state"] == "ready" and engines[0]["healthy"]:
            return
        time.sleep(0.2)
    raise AssertionError("the engine did not come back")


def subject(mail) -> str:
    return mail["message"]["Subject"]


def test_an_engine_killed_in_a_loop_alerts_by_webhook_and_email_once_then_resolves(observed, webhook, smtp):
    for _ in range(2):
        kill_engine_and_wait_ready(observed)

    firing = webhook.inbox.wait(lambda m: m["path"] == "/hook" and m["body"]["text"].startswith("[FIRING] crash-loop"),
                                what="the FIRING webhook")["body"]
    assert f"{DEFAULT_MODEL}: 2 engine restarts in the last 20s" in firing["text"]
    fields = {f["title"]: f["value"] for f in firing["attachments"][0]["fields"]}
    assert fields["model"] == DEFAULT_MODEL and fields["threshold"] == "2" and "(critical)" in firing["text"]
    mail = smtp.inbox.wait(lambda m: subject(m).startswith("[FIRING] crash-loop"), what="the FIRING email")
    assert mail["to"] == ["ops@example.com"] and mail["from"] == "appliance@example.com"
    assert f"model: {DEFAULT_MODEL}" in mail["message"].get_content()

    webhook.inbox.wait(lambda m: m["path"] == "/hook" and m["body"]["text"].startswith("[RESOLVED] crash-loop"),
                       what="the RESOLVED webhook")
    smtp.inbox.wait(lambda m: subject(m).startswith("[RESOLVED] crash-loop"), what="the RESOLVED email")
    hooks = [m["body"]["text"].split(" ")[0] for m in webhook.inbox.items if m["path"] == "/hook"
             and "crash-loop" in m["body"]["text"]]
    assert hooks == ["[FIRING]", "[RESOLVED]"], "one message per change, not one per evaluation"

    [alert] = api(observed).get("/admin/alerts", params={"state": "resolved"}).json()
    assert (alert["rule"], alert["kind"], alert["labels"]) == ("crash-loop", "engine_crash_loop", {"model": DEFAULT_MODEL})
    assert alert["fired_at"] <= alert["resolved_at"]
    assert {n: (d["event"], d["error"]) for n, d in alert["deliveries"].items() if n != "broken"} == {
        "hook": ("resolved", None), "mail": ("resolved", None)}
    broken = alert["deliveries"]["broken"]
    assert "answered 503" in broken["error"] and broken["attempts"] >= 1
    listed = appliance("alerts", "list", home=observed.home).stdout
    assert "resolved" in listed and "broken resolved FAILED" in listed and "hook resolved ok" in listed


def test_rules_and_channels_through_the_api_and_their_errors(observed, webhook):
    client = api(observed)
    rules = {r["name"]: r for r in client.get("/admin/alerts/rules").json()}
    assert set(rules) == {"crash-loop"} and rules["crash-loop"]["origin"] == "profile"
    assert rules["crash-loop"]["threshold"] == 2 and rules["crash-loop"]["unit"] == "restarts"

    for body, param in (({"kind": "latency", "channels": ["nowhere"]}, "channels"),
                        ({"kind": "gpu_memory", "model": DEFAULT_MODEL}, "model"),
                        ({"kind": "gpu_memory", "window_s": 60}, "window_s"),
                        ({"kind": "latency", "threshold": -1}, "threshold"),
                        ({"kind": "weather"}, "kind"), ({"kind": "latency", "colour": "red"}, "colour")):
        refused = client.put("/admin/alerts/rules/bad", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.text)

    set_rule = client.put("/admin/alerts/rules/slow", json={"kind": "latency", "threshold": 5, "channels": ["hook"]})
    assert set_rule.status_code == 200 and set_rule.json()["window_s"] == 300 and set_rule.json()["origin"] == "api"
    assert client.put("/admin/alerts/channels/pager", json={"webhook": {"url": f"{webhook.url}/pager"}}).status_code == 200
    refused = client.put("/admin/alerts/channels/both", json={"webhook": {"url": f"{webhook.url}/x"},
                                                                "email": {"host": "h", "sender": "a@b", "to": ["c@d"]}})
    assert refused.status_code == 400 and "exactly one of webhook and email" in refused.json()["error"]["message"]
    assert client.put("/admin/alerts/rules/paged", json={"kind": "budget", "channels": ["pager"]}).status_code == 200
    in_use = client.delete("/admin/alerts/channels/pager")
    assert in_use.status_code == 409 and "paged" in in_use.json()["error"]["message"]
    assert client.delete("/admin/alerts/channels/hook").status_code == 404  # the profile's: changed in the profile
    for name in ("paged", "slow"):
        assert client.delete(f"/admin/alerts/rules/{name}").status_code == 200
    assert client.delete("/admin/alerts/channels/pager").status_code == 200

    assert client.post("/admin/alerts/channels/hook/test").json() == {"sent": "hook"}
    assert webhook.inbox.wait(lambda m: m["body"].get("text", "").startswith("[TEST]"))["path"] == "/hook"
    failed = client.post("/admin/alerts/channels/broken/test")
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "delivery_failed"
    assert "answered 503" in failed.json()["error"]["message"]
    assert client.post("/admin/alerts/channels/nowhere/test").status_code == 404
    out = appliance("alerts", "channel", "test", "broken", home=observed.home, check=False)
    assert out.returncode == 1 and "answered 503" in out.stderr
