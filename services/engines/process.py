"""One supervised child process: start, readiness wait, restart with backoff, clean stop."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from appliance.errors import ProcessFailed

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child up this long has its backoff reset
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, so nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ManagedProcess:
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
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.health_url = health_url
        self.health_headers = health_headers or {}
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self._backoff = BACKOFF_START_S
        self._restart_at: float | None = None

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
                preexec_fn=_die_with_parent,
            )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        return self.alive() and http_ok(self.health_url, self.health_headers)

    def wait_ready(self, should_stop=lambda: False) -> None:
        """Block until the health check passes; raise if the process dies or time runs out."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if should_stop():
                raise InterruptedError(f"stopped while waiting for {self.name}")
            if not self.alive():
                raise ProcessFailed(
                    f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} during start-up. "
                    f"The end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            if http_ok(self.health_url, self.health_headers):
                return
            time.sleep(0.25)
        raise ProcessFailed(
            f"{self.name} was not ready within {self.startup_timeout_s:g} s (startup_timeout_s); see {self.log_path}"
        )

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def tend(self) -> str | None:
        """Called periodically: restart a dead process once its backoff has passed.

        Returns a line to report, or None when nothing happened.
        """
        if self.alive():
            if time.monotonic() - self.started_at > STABLE_AFTER_S:
                self._backoff = BACKOFF_START_S
            return None
        now = time.monotonic()
        if self._restart_at is None:
            self._kill_group()  # whatever the dead process started (e.g. Granian's workers) goes too
            code = self.proc.returncode if self.proc else None
            self._restart_at = now + self._backoff
            wait, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX_S)
            return f"{self.name} exited (code {code}); restarting in {wait:g} s"
        if now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.start()
            return f"{self.name} restarted (pid {self.pid}, restart #{self.restarts})"
        return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the stop timeout; reaps the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %g s; killing it", self.name, self.stop_timeout_s)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL everything left in the child's process group (it leads its own group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
