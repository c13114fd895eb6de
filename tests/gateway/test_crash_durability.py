"""kill -9 of the gateway under load loses no usage row of an answer a client received:
rows are journaled before the answer's end is sent, and replayed when the gateway restarts
(appliance/usage.py)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from appliance.usage import UsageRecorder
from tests.conftest import UPSTREAM_KEY_ENV, start_stack, wait_ready, write_profile

pytestmark = pytest.mark.stack

CLIENTS = 4
LOAD_S = 3.0
# Rows wait in memory this long before a flush: a crash always finds some there.
FLUSH_S = 5


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("crash")
    profile = write_profile(tmp / "profile.yaml", upstream, metering_flush_s=FLUSH_S, workers=2)
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key})
    yield running
    if running.proc.poll() is None:
        running.stop()


def gateway_processes(stack) -> list[psutil.Process]:
    """Granian's main process and its workers."""
    found = []
    for proc in stack.descendants():
        try:
            if "granian" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def client_loop(stack, stop: threading.Event, answered: list[str]) -> None:
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.admin_key}"},
                      timeout=10) as client:
        while not stop.is_set():
            for stream in (False, True):
                body = {"model": "remote-ok", "messages": [{"role": "user", "content": "ping"}], "stream": stream}
                try:
                    with client.stream("POST", "/chat/completions", json=body) as response:
                        text = response.read()
                except httpx.HTTPError:
                    continue  # the gateway is gone: this answer did not complete
                if response.status_code == 200 and (not stream or text.rstrip().endswith(b"data: [DONE]")):
                    answered.append(response.headers["x-request-id"])


def recorded(stack, request_ids: list[str]) -> set[str]:
    conn = sqlite3.connect(stack.home / "state.db")
    try:
        return {row[0] for row in conn.execute("SELECT request_id FROM usage WHERE status = 200")} & set(request_ids)
    finally:
        conn.close()


def test_kill_9_under_load_loses_no_answered_usage_row(crash_stack):
    stop, answered = threading.Event(), []
    clients = [threading.Thread(target=client_loop, args=(crash_stack, stop, answered)) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(LOAD_S)
        victims = gateway_processes(crash_stack)
        assert len(victims) >= 3, victims  # the main process and two workers
        for proc in victims:
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=10)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert len(answered) > 50, f"too little load to mean anything: {len(answered)} answers"

    wait_ready(crash_stack.root, 120, crash_stack.proc)  # the supervisor restarts the gateway
    deadline = time.monotonic() + 30 + FLUSH_S
    while (missing := set(answered) - recorded(crash_stack, answered)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no usage row"


JOURNALING = """
import sys, time
from pathlib import Path
from appliance.usage import UsageRecord, UsageRecorder
recorder = UsageRecorder(Path(sys.argv[1]), Path(sys.argv[2]))
recorder.open()
for i in range(3):
    recorder.record(UsageRecord(ts=time.time(), request_id=f"req-{i}", key_id="k", model="m", endpoint="chat/completions",
                                stream=False, status=200, prompt_tokens=1, completion_tokens=2, total_tokens=3,
                                latency_ms=1.0, ttft_ms=None))
print("journaled", flush=True)
time.sleep(600)
"""


def test_only_a_dead_process_journal_is_replayed_and_only_once(tmp_path):
    db, journal = tmp_path / "state.db", tmp_path / "usage-journal"
    writer = subprocess.Popen([sys.executable, "-c", JOURNALING, str(db), str(journal)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"journaled\n"
        live = UsageRecorder(db, journal)
        assert live.open() == 0, "a live process's journal is its own"
        writer.kill()
        writer.wait(10)
        for expected in (3, 0):  # a replayed journal is gone
            replayer = UsageRecorder(db, journal)
            assert replayer.open() == expected
            replayer.close()
        live.close()
    finally:
        writer.kill()
        writer.stdout.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*), count(DISTINCT request_id) FROM usage").fetchone() == (3, 3)
    conn.close()
