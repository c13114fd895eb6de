"""Usage rows in the state database, keys created and revoked from the CLI while serving."""

from __future__ import annotations

import json
import socket
import sqlite3
import time

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, appliance

pytestmark = pytest.mark.stack


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def usage_rows(stack, **where) -> list[dict]:
    conn = sqlite3.connect(stack.home / "state.db")
    conn.row_factory = sqlite3.Row
    clause = " AND ".join(f"{k} = ?" for k in where) or "1"
    rows = [dict(r) for r in conn.execute(f"SELECT * FROM usage WHERE {clause} ORDER BY id", list(where.values()))]
    conn.close()
    return rows


def new_key(stack, name: str) -> tuple[str, str]:
    created = json.loads(appliance("keys", "create", name, "--json", home=stack.home).stdout)
    return created["id"], created["key"]


def test_requests_are_metered_per_key_and_model(stack):
    key_id, secret = new_key(stack, "metering-test")
    client = stack.client(key=secret)
    # the gateway picks new keys up within a second
    answer = wait_for(lambda: _try(lambda: client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)))
    list(client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=5, stream=True))
    rows = wait_for(lambda: len(usage_rows(stack, key_id=key_id)) >= 2 and usage_rows(stack, key_id=key_id))
    plain, streamed = rows[0], rows[1]
    assert plain["model"] == DEFAULT_MODEL and plain["endpoint"] == "chat/completions"
    assert plain["status"] == 200 and plain["stream"] == 0
    assert plain["prompt_tokens"] == answer.usage.prompt_tokens
    assert plain["completion_tokens"] == answer.usage.completion_tokens
    assert plain["latency_ms"] > 0 and plain["ttft_ms"] is None
    assert streamed["stream"] == 1 and streamed["status"] == 200
    assert streamed["completion_tokens"] > 0 and streamed["prompt_tokens"] > 0, "streams are metered too"
    assert 0 < streamed["ttft_ms"] <= streamed["latency_ms"]

    summary = json.loads(appliance("usage", "--json", home=stack.home).stdout)
    mine = [r for r in summary if r["key_id"] == key_id]
    assert len(mine) == 1 and mine[0]["model"] == DEFAULT_MODEL and mine[0]["key_name"] == "metering-test"
    assert mine[0]["requests"] == 2
    assert mine[0]["completion_tokens"] == plain["completion_tokens"] + streamed["completion_tokens"]
    table = appliance("usage", "--by", "model", home=stack.home).stdout
    assert DEFAULT_MODEL in table and "REQUESTS" in table


def test_errors_are_metered_with_their_status(stack):
    key_id, secret = new_key(stack, "error-metering")
    client = stack.client(key=secret)
    wait_for(lambda: _try(lambda: client.models.list()))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    rows = wait_for(lambda: usage_rows(stack, key_id=key_id))
    assert rows[0]["status"] == 404 and rows[0]["model"] == "nope"


def test_revoked_key_is_refused_within_seconds(stack):
    key_id, secret = new_key(stack, "short-lived")
    client = stack.client(key=secret)
    wait_for(lambda: _try(lambda: client.models.list()))
    out = appliance("keys", "revoke", key_id, home=stack.home).stdout
    assert key_id in out
    wait_for(lambda: httpx.get(stack.base_url + "/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401)
    listed = json.loads(appliance("keys", "list", "--all", "--json", home=stack.home).stdout)
    assert {k["id"]: k["state"] for k in listed}[key_id] == "revoked"
    assert secret not in json.dumps(listed)


def test_client_disconnect_cancels_the_upstream_request(stack, upstream):
    before = upstream.stats()["disconnects"]
    with httpx.stream("POST", stack.base_url + "/chat/completions",
                      headers={"Authorization": f"Bearer {stack.admin_key}"},
                      json={"model": "remote-endless", "messages": [{"role": "user", "content": "go"}], "stream": True},
                      timeout=30) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)]
    # leaving the block closes the connection mid-stream
    wait_for(lambda: upstream.stats()["disconnects"] > before)
    rows = wait_for(lambda: usage_rows(stack, request_id=request_id))
    assert rows[0]["status"] == 499


def test_client_disconnect_cancels_a_waiting_plain_request(stack, upstream):
    before = upstream.stats()
    body = json.dumps({"model": "remote-slow", "messages": [{"role": "user", "content": "wait"}]}).encode()
    host, port = stack.base_url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + stack.admin_key.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: upstream.stats()["requests"] > before["requests"])
        time.sleep(0.2)  # the upstream holds the request; the gateway would give up on it at 1 s (504)
    wait_for(lambda: upstream.stats()["disconnects"] > before["disconnects"])
    assert wait_for(lambda: usage_rows(stack, model="remote-slow", status=499))  # cancelled, not timed out


def _try(call):
    try:
        return call()
    except openai.AuthenticationError:
        return None
