"""One supervised child process: start, readiness (health check, then an optional warm-up),
restart, a readable reason for every unexpected exit, marked failed after repeated crashes
at start, clean stop.

A crash at start (before READY: the health check or warm-up never passed) waits a backoff
that doubles with each one, and `max_crashes` of them within `crash_window_s` mark the
process failed; so does a crash after READY, unless the process serves requests
(`restart_at_once`: the engines and the gateway). For those, a crash after READY is most
likely one request's doing (a bug a client found): it is restarted at once, without
waiting, feeding the backoff, or counting toward the crash-loop rule, so a client
repeating that request costs everyone a restart each time, never the backoff, and can
never get the model marked failed. That cannot spin: every restart must pass the health
check and warm-up before it can crash "after READY" again."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from appliance.errors import ProcessFailed
from services.engines.exits import describe_exit

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child up this long has its backoff reset
EXIT_GRACE_S = 2.0  # a warm-up cut off by a crash: how long to wait for the exit status
_PR_SET_PDEATHSIG = 1

# States, as reported to whoever watches (services/engines/status.py).
STARTING, READY, RESTARTING, FAILED, STOPPED = "starting", "ready", "restarting", "failed", "stopped"


class WarmUpFailed(Exception):
    """The warm-up request got no good answer (the message says what came back)."""


def _die_with_parent(death_signal: int) -> None:
    """In the child: get `death_signal` if the supervisor dies, so nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, death_signal)
    except OSError:
        pass


# The supervised children listen on this machine: never reach them through a proxy that
# HTTP_PROXY (set for the host's downloads) may name.
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        with direct.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ManagedProcess:
    """`warm_up(timeout_s)` is called once the health check passes and returns a note for
    people (or raises WarmUpFailed); `program` names the process in exit meanings (e.g.
    "this llama.cpp build"); with `max_crashes`, that many crashes within `crash_window_s`
    mark it failed instead of restarting it again (with `restart_at_once`, crashes at start
    only: see the module docstring); `on_change` is called on every state change;
    `death_signal` is what it gets if the supervisor dies without stopping it (SIGKILL for a
    program that may miss a SIGTERM and has nothing to save)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        log_path: Path,
        health_url: str,
        health_headers: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 10.0,
        program: str = "the program",
        warm_up: Callable[[float], str] | None = None,
        max_crashes: int | None = None,
        crash_window_s: float = 600.0,
        restart_at_once: bool = False,
        on_change: Callable[[ManagedProcess], None] | None = None,
        death_signal: int = signal.SIGTERM,
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.health_url = health_url
        self.health_headers = health_headers or {}
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.program = program
        self.warm_up = warm_up
        self.max_crashes = max_crashes
        self.crash_window_s = crash_window_s
        self.restart_at_once = restart_at_once
        self.on_change = on_change
        self.death_signal = death_signal
        self.proc: subprocess.Popen | None = None
        self.state = STOPPED
        self.started_at = 0.0
        self.restarts = 0
        self.ready_note = ""  # what the warm-up said
        self.last_exit: str | None = None  # why it last ended (or failed to start) unasked
        self.reason: str | None = None  # why it is FAILED
        self._crashes: collections.deque[float] = collections.deque()
        self._ready_by = 0.0
        self._backoff = BACKOFF_START_S
        self._restart_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops us in order
                preexec_fn=functools.partial(_die_with_parent, self.death_signal),
            )
        self.started_at = time.monotonic()
        self._ready_by = self.started_at + self.startup_timeout_s
        log.info("started %s (pid %d)", self.name, self.proc.pid)
        self._set_state(STARTING)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_start(self) -> bool:
        """While starting: True once the health check passed and the warm-up was answered;
        raises ProcessFailed (its message says why, without the name) if it died or ran out of time."""
        if self.state == READY:
            return True
        if not self.alive():
            raise ProcessFailed(f"{self._exit_reason()} during start-up")
        if time.monotonic() > self._ready_by:
            raise ProcessFailed(f"not ready within {self.startup_timeout_s:g} s (startup_timeout_s)")
        if not http_ok(self.health_url, self.health_headers):
            return False
        if self.warm_up is not None:
            try:
                self.ready_note = self.warm_up(max(1.0, self._ready_by - time.monotonic()))
            except WarmUpFailed as exc:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(EXIT_GRACE_S)  # a crash cuts the request off: name the crash
                if not self.alive():
                    raise ProcessFailed(f"{self._exit_reason()} during its warm-up") from None
                raise ProcessFailed(f"failed its warm-up: {exc}") from None
        self._set_state(READY)
        return True

    def poll_ready(self) -> bool:
        """check_start for a first start: a failure marks it failed and raises with the end of its log."""
        try:
            return self.check_start()
        except ProcessFailed as exc:
            tail = self.log_tail()
            self.fail(exc.message)
            raise ProcessFailed(f"{self.name}: {exc.message}. The end of its log ({self.log_path}):\n{tail}") from None

    def wait_ready(self, should_stop=lambda: False) -> None:
        """Block until ready (see poll_ready)."""
        while not self.poll_ready():
            if should_stop():
                raise InterruptedError(f"stopped while waiting for {self.name}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def tend(self) -> str | None:
        """Called periodically: notice a death, restart after the backoff, see a restart through.

        Returns a line to report, or None when nothing happened.
        """
        now = time.monotonic()
        if self.state == READY:
            if self.alive():
                if now - self.started_at > STABLE_AFTER_S:
                    self._backoff = BACKOFF_START_S
                return None
            reason = self._exit_reason()
            return self._restart_now(reason) if self.restart_at_once else self._crashed(reason)
        if self.state == STARTING:  # a restart
            try:
                if self.check_start():
                    return f"{self.name} is ready again" + (f" ({self.ready_note})" if self.ready_note else "")
            except ProcessFailed as exc:
                return self._crashed(exc.message)
        elif self.state == RESTARTING and now >= self._restart_at:
            self.restarts += 1
            self.start()
            return f"{self.name} restarted (pid {self.pid}, restart #{self.restarts})"
        return None

    def _restart_now(self, reason: str) -> str:
        """A ready process that serves requests died: start it again at once (see the module docstring)."""
        self._kill_group()
        self.restarts += 1
        self.start()
        return f"{self.name} died: {reason}; restarted at once (pid {self.pid}, restart #{self.restarts})"

    def _crashed(self, reason: str) -> str:
        """Restart after the backoff, or mark it failed once it crashed too often."""
        self._kill_group()  # whatever the dead process started (e.g. Granian's workers) goes too
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes[0] < now - self.crash_window_s:
            self._crashes.popleft()
        if self.max_crashes is not None and len(self._crashes) >= self.max_crashes:
            self.fail(f"{len(self._crashes)} crashes within {self.crash_window_s:g} s, the last: {reason}")
            return f"{self.name} failed: {self.reason}; not restarting it"
        self._restart_at = now + self._backoff
        wait, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX_S)
        self._set_state(RESTARTING)
        return f"{self.name} died: {reason}; restarting in {wait:g} s"

    def fail(self, reason: str) -> None:
        """Give up on it: it stays down with its reason until started again."""
        self._kill_group()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(self.stop_timeout_s)
        self.reason = reason
        self._note(f"marked failed: {reason}")
        self._set_state(FAILED)

    def _exit_reason(self) -> str:
        self.last_exit = describe_exit(self.proc.returncode, self.program)
        self._note(self.last_exit)
        return self.last_exit

    def _note(self, line: str) -> None:
        """A line of the supervisor's in the process's own log, where people look first."""
        try:
            with open(self.log_path, "a") as logfile:
                logfile.write(f"[appliance {time.strftime('%Y-%m-%d %H:%M:%S')}] {self.name} {line}\n")
        except OSError:
            pass

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_change is not None:
            try:
                self.on_change(self)
            except OSError as exc:
                log.warning("cannot report the state of %s: %s", self.name, exc)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the stop timeout; reaps the process."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s; killing it", self.name, self.stop_timeout_s)
                self._kill_group()
                self.proc.wait()
        if self.proc is not None:
            self._kill_group()
        self._set_state(STOPPED)

    def _kill_group(self) -> None:
        """SIGKILL everything left in the child's process group (it leads its own group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
