"""Usage rows in the state database, keys created and revoked from the CLI while serving;
abandoned requests cancelled at the engine and metered with what was generated."""

from __future__ import annotations

import csv
import json
import re
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
    answer = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5)  # a new key works at once
    list(client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=5, stream=True))
    rows = wait_for(lambda: len(usage_rows(stack, key_id=key_id)) >= 2 and usage_rows(stack, key_id=key_id))
    plain, streamed = rows[0], rows[1]
    assert plain["model"] == DEFAULT_MODEL and plain["endpoint"] == "chat/completions"
    assert plain["status"] == 200 and plain["stream"] == 0
    assert plain["prompt_tokens"] == answer.usage.prompt_tokens
    assert plain["completion_tokens"] == answer.usage.completion_tokens
    # llama.cpp answers are asked of the engine as streams, so even a whole answer has its first token's time
    assert 0 < plain["ttft_ms"] <= plain["latency_ms"]
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
    client.models.list()  # made by the CLI in the database, accepted at once
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    rows = wait_for(lambda: usage_rows(stack, key_id=key_id))
    assert rows[0]["status"] == 404 and rows[0]["model"] == "nope"


def test_revoked_key_is_refused_within_seconds(stack):
    key_id, secret = new_key(stack, "short-lived")
    client = stack.client(key=secret)
    client.models.list()  # made by the CLI in the database, accepted at once
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


LONG = 1500  # tokens the engine would generate if nobody stopped it
NO_END = {"0": -100, "2": -100}  # SmolLM2's <|endoftext|> and <|im_end|>: it writes until stopped


def engine_log(stack) -> str:
    return (stack.home / "logs" / f"engine-{DEFAULT_MODEL}-0.log").read_text()


def raw_request(stack, secret: str, body: bytes, content_length: int | None = None) -> socket.socket:
    """A POST sent by hand, so the test decides when the client goes away."""
    host, port = stack.root.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + secret.encode() + b"\r\n"
                 b"Content-Length: " + str(content_length or len(body)).encode() + b"\r\n\r\n" + body)
    return sock


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_abandoned_engine_request_is_cancelled_and_metered(stack, stream):
    """The engine stops a request its client abandoned long before it could have finished;
    the answer cut short, streamed or not, is metered with the tokens generated until then."""
    key_id, secret = new_key(stack, f"abandon-{stream}")
    stack.client(key=secret).models.list()
    log = engine_log(stack)
    started, cancelled = log.count("processing task"), log.count("cancel task")
    body = json.dumps({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": LONG, "logit_bias": NO_END, "stream": stream}).encode()
    with raw_request(stack, secret, body) as sock:
        wait_for(lambda: engine_log(stack).count("processing task") > started, timeout=60)
        if stream:
            received = b""
            while received.count(b'"content":"') < 3:  # a few tokens reached the client
                received += sock.recv(65536)
        else:
            time.sleep(2)  # some tokens are generated, none reaches the client
    # the client is gone: the engine cancels the task, whose tokens are far from LONG
    wait_for(lambda: engine_log(stack).count("cancel task") > cancelled, timeout=120)
    released = wait_for(lambda: re.findall(r"stop processing: n_tokens = (\d+)", engine_log(stack).split("cancel task")[-1]))
    assert int(released[0]) < LONG // 2, released
    [row] = wait_for(lambda: usage_rows(stack, key_id=key_id))
    assert row["status"] == 499 and row["stream"] == stream
    least = received.count(b'"content":"') if stream else 1
    assert row["prompt_tokens"] > 0 and least <= row["completion_tokens"] < LONG // 2, row
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


def test_stream_cut_by_an_engine_failure_is_metered(stack):
    """remote-broken streams two chunks, then drops the connection: both are counted."""
    key_id, secret = new_key(stack, "broken-stream")
    client = stack.client(key=secret)
    client.models.list()  # made by the CLI in the database, accepted at once
    with pytest.raises(openai.APIError, match="failed mid-stream"):  # the stream's error event
        list(client.chat.completions.create(model="remote-broken", messages=[{"role": "user", "content": "x"}], stream=True))
    [row] = wait_for(lambda: usage_rows(stack, key_id=key_id))
    assert row["status"] == 502 and row["completion_tokens"] == 2, row


def test_client_leaving_while_sending_its_body_is_a_499(stack):
    key_id, secret = new_key(stack, "half-body")
    stack.client(key=secret).models.list()
    log_size = (stack.home / "logs" / "gateway.log").stat().st_size
    with raw_request(stack, secret, b'{"model": "' + DEFAULT_MODEL.encode() + b'", "mess', content_length=1000):
        time.sleep(0.2)  # the gateway is waiting for the rest
    [row] = wait_for(lambda: usage_rows(stack, key_id=key_id))
    assert row["status"] == 499 and row["model"] == ""
    time.sleep(0.5)  # anything the gateway logs about it is written by now
    with (stack.home / "logs" / "gateway.log").open() as gateway_log:
        gateway_log.seek(log_size)
        assert "Traceback" not in gateway_log.read()


def test_usage_by_hour_as_csv_from_the_api_and_the_cli(stack, tmp_path):
    key_id, secret = new_key(stack, "analytics")
    client = stack.client(key=secret)
    for _ in range(2):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    wait_for(lambda: len(usage_rows(stack, key_id=key_id)) == 3)
    admin = httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"})
    hour = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime())
    answer = admin.get("/admin/usage", params={"since": "1h", "by": "key,model", "bucket": "hour"}).json()
    mine = {r["model"]: r for r in answer["rows"] if r["key_id"] == key_id}
    assert {m: (r["requests"], r["errors"]) for m, r in mine.items()} == {DEFAULT_MODEL: (2, 0), "nope": (1, 1)}
    assert mine[DEFAULT_MODEL]["bucket"] in (hour, time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(time.time() - 60)))

    out = tmp_path / "usage.csv"
    appliance("usage", "--since", "1h", "--by", "key", "--bucket", "day", "--csv", "-o", str(out), home=stack.home)
    rows = [r for r in csv.DictReader(out.open()) if r["key_id"] == key_id]
    assert len(rows) == 1 and rows[0]["requests"] == "3" and rows[0]["key_name"] == "analytics"
    assert rows[0]["bucket"] == time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime()) and rows[0]["currency"] == "USD"

    for params, param in (({"bucket": "week"}, "bucket"), ({"since": "last tuesday"}, "since"),
                          ({"since": "1h", "until": "2h"}, "until"), ({"by": "colour"}, "by"),
                          ({"format": "xml"}, "format")):
        refused = admin.get("/admin/usage", params=params)
        assert refused.status_code == 400, (params, refused.text)
        assert refused.json()["error"]["param"] == param, refused.text
