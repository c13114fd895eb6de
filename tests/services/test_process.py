"""Supervised processes say why they ended, answer a warm-up before they count as ready,
and stop being restarted after repeated crashes: real child processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from appliance.config import ModelConfig
from appliance.errors import ProcessFailed
from services.engines.exits import describe_exit
from services.engines.process import FAILED, READY, RESTARTING, ManagedProcess
from services.engines.status import StatusReporter, read_statuses
from services.engines.warmup import warm_up_call
from tests.conftest import free_port

LLAMA = "this llama.cpp build"
SIGILL_MEANING = "illegal instruction: this llama.cpp build uses CPU instructions this machine cannot run"


@pytest.mark.parametrize("signum, words", [
    (signal.SIGILL, SIGILL_MEANING),
    (signal.SIGSEGV, "segmentation fault"),
    (signal.SIGBUS, "bus error"),
    (signal.SIGABRT, "aborted"),
    (signal.SIGKILL, "out-of-memory killer"),
    (signal.SIGFPE, "arithmetic fault"),
])
def test_each_signal_has_its_name_and_meaning(signum, words):
    proc = subprocess.Popen(["sleep", "30"])
    os.kill(proc.pid, signum)
    reason = describe_exit(proc.wait(10), LLAMA)
    assert reason.startswith(f"killed by {signal.Signals(signum).name} (") and words in reason


def test_an_exit_code_is_named():
    assert describe_exit(subprocess.run([sys.executable, "-c", "raise SystemExit(3)"]).returncode) == "exited with code 3"


def child(tmp_path, argv: list[str], port: int, **options) -> ManagedProcess:
    return ManagedProcess("engine m#0", argv, log_path=tmp_path / "logs" / "engine-m-0.log",
                          health_url=f"http://127.0.0.1:{port}/", startup_timeout_s=20, program=LLAMA, **options)


def web_server(tmp_path, **options) -> ManagedProcess:
    """A real HTTP server as the child; its health check is its root page."""
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    return child(tmp_path, argv, port, **options)


def tend_until(process: ManagedProcess, state: str, timeout: float = 20) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while process.state != state:
        assert time.monotonic() < deadline, f"still {process.state}: {lines}"
        if line := process.tend():
            lines.append(line)
        time.sleep(0.05)
    return lines


def test_a_crash_at_start_is_named_in_the_error_the_log_and_the_status(tmp_path):
    home = tmp_path / "home"
    reporter = StatusReporter(home, "m", 0, "http://127.0.0.1:1/v1")
    process = child(tmp_path, [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"],
                    free_port(), on_change=reporter)
    process.start()
    with pytest.raises(ProcessFailed) as failed:
        process.wait_ready()
    assert f"engine m#0: killed by SIGILL ({SIGILL_MEANING}) during start-up" in failed.value.message
    assert f"killed by SIGILL ({SIGILL_MEANING})" in process.log_path.read_text()
    [status] = read_statuses(home).values()
    assert status.state == FAILED and "SIGILL" in status.reason and SIGILL_MEANING in status.last_exit


def test_ready_only_once_the_warm_up_is_answered(tmp_path):
    process = web_server(tmp_path, warm_up=lambda timeout_s: "warm-up: one page")
    process.start()
    try:
        process.wait_ready()
        assert process.state == READY and process.ready_note == "warm-up: one page"
    finally:
        process.stop()


def test_a_warm_up_that_gets_an_error_fails_the_start(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    model = ModelConfig(name="m", engine="llamacpp", path="/models/m.gguf")
    process = child(tmp_path, argv, port, warm_up=warm_up_call(model, f"http://127.0.0.1:{port}/v1", "key"))
    process.start()
    with pytest.raises(ProcessFailed) as failed:
        process.wait_ready()  # http.server answers a POST with 501
    assert "failed its warm-up: POST /completions answered HTTP 501" in failed.value.message
    assert not process.alive()


def test_repeated_crashes_mark_it_failed_with_the_reason(tmp_path):
    home = tmp_path / "home"
    process = web_server(tmp_path, max_crashes=2, crash_window_s=60,
                         on_change=StatusReporter(home, "m", 0, "http://127.0.0.1:1/v1"))
    process.start()
    try:
        process.wait_ready()
        os.kill(process.pid, signal.SIGKILL)
        [died] = tend_until(process, RESTARTING)
        assert died.startswith("engine m#0 died: killed by SIGKILL (killed: most likely by the kernel's out-of-memory killer")
        assert died.endswith("; restarting in 1 s")
        lines = tend_until(process, READY)
        assert lines[0].startswith("engine m#0 restarted (pid ") and lines[-1] == "engine m#0 is ready again"
        os.kill(process.pid, signal.SIGSEGV)
        [failed] = tend_until(process, FAILED)
        assert failed.startswith("engine m#0 failed: 2 crashes within 60 s, the last: killed by SIGSEGV (segmentation fault")
        assert failed.endswith("; not restarting it")
        time.sleep(1.5)  # past the backoff: still no restart
        assert process.tend() is None and process.state == FAILED and not process.alive()
        [status] = read_statuses(home).values()
        assert (status.state, status.restarts) == (FAILED, 1) and status.reason.startswith("2 crashes within 60 s")
        assert "marked failed: 2 crashes" in process.log_path.read_text()
    finally:
        process.stop()
    assert read_statuses(home) == {}


def test_a_clean_stop_removes_the_status(tmp_path):
    home = tmp_path / "home"
    process = web_server(tmp_path, on_change=StatusReporter(home, "m", 0, "http://127.0.0.1:1/v1/"))
    process.start()
    process.wait_ready()
    assert read_statuses(home)[("m", "http://127.0.0.1:1/v1")].state == READY
    process.stop()
    assert read_statuses(home) == {}
