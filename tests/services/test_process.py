"""Supervised processes say why they ended, answer a warm-up before they count as ready,
are restarted at once when they crash after being ready, and stop being restarted after
repeated crashes at start: real child processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.config import ModelConfig
from appliance.errors import ProcessFailed
from services.engines.exits import describe_exit
from services.engines.process import FAILED, READY, RESTARTING, STARTING, ManagedProcess
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
    """A real HTTP server as the child; its health check is its root page. It exits with
    code 3 at start while the file tmp_path/CRASH_AT_START exists."""
    port = free_port()
    argv = [sys.executable, "-c", FLAKY_SERVER, str(tmp_path / CRASH_AT_START),
            str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    return child(tmp_path, argv, port, **options)


def serving_process(tmp_path, home: Path) -> ManagedProcess:
    """A ready web server that serves requests as an engine does (restart_at_once), reporting its status in `home`."""
    process = web_server(tmp_path, max_crashes=2, crash_window_s=60, restart_at_once=True,
                         on_change=StatusReporter(home, "m", 0, "http://127.0.0.1:1/v1"))
    process.start()
    try:
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process


CRASH_AT_START = "crash-at-start"
FLAKY_SERVER = ("import os, runpy, sys; os.path.exists(sys.argv[1]) and os._exit(3); "
                "sys.argv = ['http.server', *sys.argv[2:]]; runpy.run_module('http.server', run_name='__main__')")


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


def test_a_ready_process_that_crashes_is_restarted_at_once_every_time(tmp_path):
    """A crash after READY of a process that serves requests (one request's doing) waits no
    backoff and never counts toward max_crashes: crashing a ready engine repeatedly costs a
    restart each time, never FAILED."""
    home = tmp_path / "home"
    process = serving_process(tmp_path, home)
    try:
        for restart, signum in enumerate([signal.SIGSEGV, signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT], start=1):
            dead = process.pid
            os.kill(dead, signum)
            process.proc.wait(10)
            died = process.tend()  # the one call that notices the death has started it again
            assert died.startswith(f"engine m#0 died: killed by {signal.Signals(signum).name} (")
            assert died.endswith(f"; restarted at once (pid {process.pid}, restart #{restart})")
            assert process.state == STARTING and process.pid != dead and process.alive()
            assert tend_until(process, READY) == ["engine m#0 is ready again"]
        [status] = read_statuses(home).values()
        assert (status.state, status.restarts) == (READY, 4) and status.last_exit.startswith("killed by SIGABRT")
    finally:
        process.stop()


def test_a_process_that_serves_no_requests_backs_off_after_any_crash(tmp_path):
    """Litestream, MinIO, the job worker: a crash after READY is the process's own trouble."""
    process = web_server(tmp_path, max_crashes=2, crash_window_s=60)
    process.start()
    try:
        process.wait_ready()
        os.kill(process.pid, signal.SIGKILL)
        process.proc.wait(10)
        assert process.tend().endswith("; restarting in 1 s") and process.state == RESTARTING
        [restarted] = tend_until(process, STARTING)
        assert restarted.startswith("engine m#0 restarted (pid ")
        tend_until(process, READY)
        os.kill(process.pid, signal.SIGKILL)
        process.proc.wait(10)
        assert process.tend().startswith("engine m#0 failed: 2 crashes within 60 s, the last: killed by SIGKILL")
    finally:
        process.stop()


def test_repeated_crashes_at_start_back_off_then_mark_it_failed_with_the_reason(tmp_path):
    home = tmp_path / "home"
    process = serving_process(tmp_path, home)
    try:
        (tmp_path / CRASH_AT_START).touch()  # from now on every start fails
        os.kill(process.pid, signal.SIGKILL)
        process.proc.wait(10)
        assert process.tend().endswith("; restarted at once (pid %d, restart #1)" % process.pid)
        [died] = tend_until(process, RESTARTING)
        assert died == "engine m#0 died: exited with code 3 during start-up; restarting in 1 s"
        lines = tend_until(process, FAILED)
        assert lines[0] == f"engine m#0 restarted (pid {process.pid}, restart #2)"
        assert lines[-1] == ("engine m#0 failed: 2 crashes within 60 s, the last: exited with code 3 during start-up; "
                             "not restarting it")
        time.sleep(2.5)  # past the next backoff (2 s): still no restart
        assert process.tend() is None and process.state == FAILED and not process.alive()
        [status] = read_statuses(home).values()
        assert (status.state, status.restarts) == (FAILED, 2) and status.reason.startswith("2 crashes within 60 s")
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


# A supervisor in its own process: starts a child that ignores SIGTERM (as a llama-server
# stuck in its signal handler does) with the death signal named on its command line,
# prints the child's pid, then waits to be killed.
SUPERVISOR = """
import signal, sys, time
from pathlib import Path
from services.engines.process import ManagedProcess
child = ManagedProcess("engine m#0", [sys.executable, "-c",
                       "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring', flush=True); "
                       "time.sleep(60)"],
                       log_path=Path(sys.argv[1]), health_url="http://127.0.0.1:1/",
                       death_signal=signal.Signals[sys.argv[2]])
child.start()
while "ignoring" not in Path(sys.argv[1]).read_text():
    time.sleep(0.01)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("death_signal, survives", [("SIGTERM", True), ("SIGKILL", False)])
def test_the_death_signal_reaches_the_child_when_the_supervisor_is_killed(tmp_path, death_signal, survives):
    import psutil

    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path / "child.log"), death_signal],
                                  stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    child_pid = int(supervisor.stdout.readline())
    orphan = psutil.Process(child_pid)
    supervisor.kill()
    supervisor.wait(10)
    try:
        gone, alive = psutil.wait_procs([orphan], timeout=5)
        assert bool(alive) == survives, f"{death_signal}: the child {'lives on' if alive else 'is gone'}"
    finally:
        if orphan.is_running():
            orphan.kill()


def test_llama_server_replicas_die_with_sigkill_and_vllm_ones_with_sigterm(tmp_path):
    from appliance.planning.plan_model import ModelPlan, Placement
    from services.engines.launch import replica_process

    for engine, death_signal in (("llamacpp", signal.SIGKILL), ("vllm", signal.SIGTERM)):
        model = ModelConfig(name="m", engine=engine, path=str(tmp_path / "m.gguf"))
        process, _ = replica_process(model, ModelPlan(name="m", engine=engine), Placement(node="local", device="cpu"),
                                     0, tmp_path)
        assert process.death_signal == death_signal, engine


def test_the_health_check_never_goes_through_the_hosts_proxy(tmp_path, monkeypatch):
    """HTTP_PROXY set for the host's downloads must not take loopback health checks to a dead proxy."""
    from services.engines.process import http_ok

    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    process = web_server(tmp_path)
    process.start()
    try:
        process.wait_ready()
        assert http_ok(process.health_url)
    finally:
        process.stop()
