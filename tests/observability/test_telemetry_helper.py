"""The telemetry helper (services/telemetry): a process of its own beside each gateway
worker that exports its spans and masks and writes its request logs. Run here as the
gateway runs it, a subprocess fed frames on stdin; and in the stack, killed and started
again."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time

import msgspec
import psutil
import pytest

from appliance.config import TracingConfig
from appliance.db import open_db
from services.telemetry import frames
from tests.observability.test_request_logs import EMAIL, RRN, admin, ask, kept


def span_record(trace_id: str, request_id: str) -> frames.SpanRecord:
    start = time.time_ns()
    return frames.SpanRecord(trace_id, secrets.token_hex(8), "", "chat/completions", start, start + 9_000_000,
            start + 1_000_000, start + 2_000_000, start + 3_000_000, start + 3_000_000, start + 5_000_000,
            secrets.token_hex(8), "http://127.0.0.1:9/v1/chat/completions", 200, request_id, "m", None, 12, 4, None)


def log_record(request_id: str) -> frames.LogRecord:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"I am {EMAIL}, {RRN}"}]}).encode()
    answer = json.dumps({"id": "x", "choices": [{"message": {"role": "assistant", "content": "hi"}}]}).encode()
    return frames.LogRecord(time.time(), request_id, "key_1", None, "team_1", "m", "chat/completions", 200, 12.5, body, answer, False)


def ignores_sigterm(pid: int) -> bool:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    return bool(int(status["SigIgn"], 16) & (1 << (signal.SIGTERM - 1)))


def test_the_helper_writes_and_exports_what_it_holds_when_its_stdin_ends_not_at_sigterm(tmp_path, otlp):
    db_path = tmp_path / "state.db"
    open_db(db_path).conn.close()
    settings = frames.Settings(db_path=str(db_path), tracing=TracingConfig(otlp_endpoint=otlp.url, service_name="helper-test"))
    helper = subprocess.Popen([sys.executable, "-m", "services.telemetry", msgspec.json.encode(settings).decode()],
                              stdin=subprocess.PIPE)
    trace_id = secrets.token_hex(16)
    helper.stdin.write(frames.encode([span_record(trace_id, "req_helper1")], [log_record("req_helper1")]))
    helper.stdin.write(frames.encode([], [log_record("req_helper2")]))
    helper.stdin.flush()
    deadline = time.monotonic() + 10
    while not ignores_sigterm(helper.pid):
        assert time.monotonic() < deadline and helper.poll() is None, "the helper never ignored SIGTERM"
        time.sleep(0.01)
    helper.send_signal(signal.SIGTERM)  # the gateway worker's to take, not the helper's
    with pytest.raises(subprocess.TimeoutExpired):
        helper.wait(1.5)
    helper.stdin.close()
    assert helper.wait(30) == 0

    spans = otlp.trace(trace_id, {"POST /v1/chat/completions", "authenticate", "route", "policy", "engine", "stream"})
    root = spans["POST /v1/chat/completions"]
    assert root["attributes"]["gen_ai.usage.input_tokens"] == 12 and root["service"]["service.name"] == "helper-test"
    assert spans["stream"]["start"] == spans["engine"]["end"], "the answer streams from when the engine's started"
    db = open_db(db_path, migrate=False)
    rows = {r[0]: r for r in db.execute("SELECT request_id, team_id, request, response FROM request_logs")}
    assert set(rows) == {"req_helper1", "req_helper2"}
    assert EMAIL not in rows["req_helper1"][2] and RRN not in rows["req_helper1"][2] and "I am" in rows["req_helper1"][2]
    assert json.loads(rows["req_helper1"][3])["choices"][0]["message"]["content"] == "hi"


def helpers(stack) -> list[psutil.Process]:
    found = []
    for proc in stack.descendants():
        try:
            if "services.telemetry" in proc.cmdline():
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.stack
def test_a_killed_helper_is_started_again_and_logs_go_on(observed):
    client = admin(observed)
    client.post("/admin/teams", json={"name": "helper-team", "log_requests": True})
    key = client.post("/admin/keys", json={"name": "helper-key", "team": "helper-team", "role": "developer"}).json()
    assert kept(observed, ask(observed, key["key"], "remote-ok")).status_code == 200
    first = helpers(observed)
    assert first, "a gateway worker that logs has its helper"
    for proc in first:
        proc.kill()
    psutil.wait_procs(first, timeout=10)
    after = ask(observed, key["key"], "remote-ok")
    assert kept(observed, after).status_code == 200, "a new helper writes the next request's log"
    assert {p.pid for p in helpers(observed)}.isdisjoint(p.pid for p in first)
