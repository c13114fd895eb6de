"""`appliance up` as a supervisor: restarts, clean stops, first-start admin key."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time

import httpx
import psutil
import pytest

from tests.conftest import DEFAULT_MODEL, engine_tasks, readiness, start_stack, wait_ready, write_profile

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """A stack of its own, with the default model only, for tests that hurt it."""
    tmp = tmp_path_factory.mktemp("solo")
    running = start_stack(tmp, write_profile(tmp / "profile.yaml", None))
    yield running
    if running.proc.poll() is None:
        running.stop()


def chat(stack, **extra):
    return stack.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=5, **extra)


def test_first_start_prints_the_admin_key_once_and_saves_it_0600(solo):
    banner = solo.output.read_text()
    assert solo.admin_key in banner
    assert f"http://127.0.0.1:{solo.port}/v1" in banner
    mode = stat.S_IMODE(os.stat(solo.home / "admin.key").st_mode)
    assert mode == 0o600


def restarts(solo) -> int:
    return readiness(solo.root)["models"][DEFAULT_MODEL]["engines"][0]["restarts"]


def wait_restarted(solo, old_pid: int, restarts_before: int) -> int:
    """Until a new engine process runs and the gateway sees it ready (its restart counted) and healthy."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and solo.engine_pids() in ([], [old_pid]):
        time.sleep(0.2)
    [new_pid] = solo.engine_pids()
    assert new_pid != old_pid
    while time.monotonic() < deadline + 60:
        [replica] = readiness(solo.root)["models"][DEFAULT_MODEL]["engines"]
        if replica["restarts"] > restarts_before and replica["state"] == "ready" and replica["healthy"]:
            break
        time.sleep(0.2)
    wait_ready(solo.root, 120, solo.proc)
    return new_pid


def test_killed_engine_is_restarted(solo):
    [pid], before = solo.engine_pids(), restarts(solo)
    os.kill(pid, signal.SIGKILL)
    wait_restarted(solo, pid, before)
    assert chat(solo).choices[0].message.content
    assert "restarted" in solo.output.read_text()


def test_engine_dying_mid_stream_ends_the_stream_with_an_error(solo):
    wait_ready(solo.root, 120, solo.proc)
    with httpx.stream("POST", solo.base_url + "/chat/completions",
                      headers={"Authorization": f"Bearer {solo.admin_key}"},
                      json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
                            "max_tokens": 1500, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        first = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert first
        [pid], before = solo.engine_pids(), restarts(solo)
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert '"error"' in rest[-2]
    wait_restarted(solo, pid, before)


def test_unready_while_engine_cannot_answer(solo):
    """A frozen engine (SIGSTOP) fails its health checks: /readyz says so until it answers again. A
    killed one is restarted in well under a second now, often between two health checks, so it
    cannot hold readiness down long enough to be seen (test_killed_engine_is_restarted)."""
    [pid] = solo.engine_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and readiness(solo.root)["status"] == "ready":
            time.sleep(0.1)
        assert readiness(solo.root)["status"] == "not ready"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    wait_ready(solo.root, 120, solo.proc)


def test_sigterm_stops_everything(solo):
    children = solo.descendants()
    assert len(children) >= 2, "an engine and the gateway run as children"
    solo.stop()  # asserts nothing is left
    assert solo.proc.returncode == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)
    assert "stopped." in solo.output.read_text()


def test_ctrl_c_stops_everything_and_restart_keeps_the_key(tmp_path):
    profile = write_profile(tmp_path / "profile.yaml", None)
    first = start_stack(tmp_path, profile)
    key = first.admin_key
    children = first.descendants()
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive
    second = start_stack(tmp_path, profile)
    try:
        assert second.admin_key == key
        banner = second.output.read_text()
        assert key not in banner and "admin.key" in banner, "the key is printed only on first start"
        assert chat(second).choices[0].message.content
    finally:
        second.stop()


def test_children_stop_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL gives the supervisor no chance to clean up; its children still go."""
    running = start_stack(tmp_path, write_profile(tmp_path / "profile.yaml", None))
    children = running.descendants()
    assert children
    running.proc.kill()
    running.proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"orphans: {[p.pid for p in alive]}"


def test_two_gateway_workers_share_metrics_and_metering(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    running = start_stack(tmp_path, write_profile(tmp_path / "profile.yaml", None, workers=2))
    try:
        gateway_procs = [p for p in running.descendants() if "granian" in " ".join(p.cmdline())]
        assert len(gateway_procs) == 3, "a Granian main process and two workers"
        workers_seen: set[str] = set()
        sent = 0
        while len(workers_seen) < 2 and sent < 60:  # a new connection each time, so both workers get some
            response = httpx.post(running.base_url + "/embeddings", json={"model": DEFAULT_MODEL, "input": "hello"},
                                  headers={"Authorization": f"Bearer {running.admin_key}"}, timeout=30)
            assert response.status_code == 200
            workers_seen.add(response.headers["x-request-id"][:16])  # the id starts with the worker's prefix
            sent += 1
        assert len(workers_seen) == 2, "both workers answered"
        text = httpx.get(running.root + "/metrics").text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        total = sum(s.value for s in samples if s.name == "appliance_requests_total" and s.labels["endpoint"] == "embeddings")
        assert total == sent, "every worker's requests are counted once"
        in_flight = [s.value for s in samples if s.name == "appliance_requests_in_flight"]
        assert in_flight and sum(in_flight) == 0
    finally:
        running.stop()
    import sqlite3

    rows = sqlite3.connect(running.home / "state.db").execute("SELECT count(*) FROM usage WHERE endpoint = 'embeddings'").fetchone()[0]
    assert rows == sent, "usage rows from both workers are written before they stop"


def test_replicas_share_the_load_and_a_dead_one_is_skipped(tmp_path):
    running = start_stack(tmp_path, write_profile(tmp_path / "profile.yaml", None, replicas=2))
    try:
        client = running.client()
        for _ in range(4):
            client.embeddings.create(model=DEFAULT_MODEL, input="hello")
        logs = [running.home / "logs" / f"engine-{DEFAULT_MODEL}-{i}.log" for i in (0, 1)]
        served = [engine_tasks(log.read_text())[1] for log in logs]
        assert served == [2, 2], "round-robin over the two replicas"
        # Kill one replica and ask at once, before any health probe notices: the gateway
        # finds the refused connection, marks it down and uses the other replica.
        victim = running.engine_pids()[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(4):
            assert client.embeddings.create(model=DEFAULT_MODEL, input="hello").data
        assert readiness(running.root)["models"][DEFAULT_MODEL]["healthy"] <= 2
    finally:
        running.stop()


def test_killed_gateway_is_restarted(tmp_path):
    running = start_stack(tmp_path, write_profile(tmp_path / "profile.yaml", None))
    try:
        [main] = [p for p in psutil.Process(running.proc.pid).children() if "granian" in " ".join(p.cmdline())]
        workers = main.children()
        assert workers
        os.kill(main.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        restarted = "gateway died: killed by SIGKILL"
        while time.monotonic() < deadline and restarted not in running.output.read_text():
            time.sleep(0.2)
        assert f"{restarted} (" in running.output.read_text() and "; restarted at once (pid " in running.output.read_text()
        wait_ready(running.root, 60, running.proc)
        assert running.client().models.list().data[0].id == DEFAULT_MODEL
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "the dead gateway's workers do not linger"
    finally:
        running.stop()
