"""Request logs end to end: off by default; a team that logs keeps its members' requests and
answers with personal data masked, found by request id through the API and the CLI, and
reading one is audited."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, appliance

pytestmark = pytest.mark.stack

RRN = "900101-1234568"  # a Korean resident registration number (valid check digit)
EMAIL = "kim.minsu@example.co.kr"


def admin(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=60)


def ask(stack, key: str, model: str, stream: bool = False) -> str:
    answer = httpx.post(f"{stack.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        json={"model": model, "stream": stream, "max_tokens": 8, "messages": [
                            {"role": "system", "content": "Be brief."},
                            {"role": "user", "content": f"My number is {RRN}, mail {EMAIL}. Say hi."}]})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-request-id"]


def kept(stack, request_id: str) -> dict:
    client, deadline = admin(stack), time.monotonic() + 15
    while True:
        found = client.get(f"/admin/request-logs/{request_id}")
        if found.status_code == 200 or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_logging_teams_requests_are_kept_masked_and_found_by_id(observed):
    client = admin(observed)
    team = client.post("/admin/teams", json={"name": "logged-team", "log_requests": True}).json()
    member = client.post("/admin/keys", json={"name": "logged-key", "team": "logged-team", "role": "developer"}).json()
    other = client.post("/admin/keys", json={"name": "unlogged-key", "role": "developer"}).json()

    plain, streamed = ask(observed, member["key"], DEFAULT_MODEL), ask(observed, member["key"], "remote-ok", stream=True)
    unlogged = ask(observed, other["key"], DEFAULT_MODEL)

    entry = kept(observed, plain).json()
    assert (entry["model"], entry["status"], entry["team_id"], entry["key_id"]) == (
        DEFAULT_MODEL, 200, team["id"], member["id"])
    text = json.dumps(entry, ensure_ascii=False)
    assert RRN not in text and EMAIL not in text, "personal data is masked before it is kept"
    assert "Say hi." in entry["request"]["messages"][1]["content"]
    assert entry["response"]["choices"][0]["message"]["content"]
    stream_entry = kept(observed, streamed).json()
    assert stream_entry["response"] == "pong", "a stream is kept as the text of its answer"
    missing = client.get(f"/admin/request-logs/{unlogged}")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "request_id"

    listed = client.get("/admin/request-logs", params={"team": team["id"], "since": "1h"}).json()
    assert {r["request_id"] for r in listed} == {plain, streamed} and "request" not in listed[0]
    assert client.get("/admin/request-logs", params={"since": "soon"}).json()["error"]["param"] == "since"

    shown = appliance("logs", "show", plain, home=observed.home).stdout
    assert plain in shown and "Say hi." in shown and RRN not in shown
    assert streamed in appliance("logs", "list", "--team", team["id"], home=observed.home).stdout
    audited = client.get("/admin/audit", params={"action": "request_log.read", "target": f"request/{plain}"}).json()
    assert len(audited) >= 2, "each reading of a kept request is audited"
