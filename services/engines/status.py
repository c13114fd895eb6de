"""What runs an engine replica tells the gateway: the replica's state, and why it died or failed.

`appliance up` and the deployment controller write one small JSON file per replica
(appliance.home.engine_status_dir) on every state change and remove it once the replica
is stopped; the gateway reads them every second, routes only to replicas that are ready
(or unreported), and says why the others are not in /readyz, its metrics and its 503s. A
file names its replica's endpoint, so one left behind by an earlier run (other ports) is
never taken for a replica of this one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from appliance.home import engine_status_dir
from services.engines.process import STOPPED, ManagedProcess


class ReplicaStatus(msgspec.Struct, kw_only=True):
    model: str
    replica: int
    base_url: str
    state: str  # services.engines.process: starting, ready, restarting, failed
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None  # e.g. "killed by SIGILL (illegal instruction: ...)"
    reason: str | None = None  # why it failed, when it did
    updated_at: float = 0.0
    gpus: list[int] = []  # the GPUs the plan gives it (indexes)
    gpu_bytes: int = 0  # and what it plans to use of each: a training job leaves that room


class StatusReporter:
    """ManagedProcess.on_change for one replica."""

    def __init__(self, home: Path, model: str, replica: int, base_url: str, gpus: list[int] = (), gpu_bytes: int = 0):
        self.path = engine_status_dir(home) / f"{model}-{replica}.json"
        self.model, self.replica, self.base_url = model, replica, base_url
        self.gpus, self.gpu_bytes = list(gpus), gpu_bytes

    def __call__(self, process: ManagedProcess) -> None:
        if process.state == STOPPED:
            self.path.unlink(missing_ok=True)
            return
        status = ReplicaStatus(model=self.model, replica=self.replica, base_url=self.base_url, state=process.state,
                               pid=process.pid, restarts=process.restarts, last_exit=process.last_exit,
                               reason=process.reason, updated_at=time.time(), gpus=self.gpus,
                               gpu_bytes=self.gpu_bytes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_bytes(msgspec.json.encode(status))
        os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one


def read_statuses(home: Path) -> dict[tuple[str, str], ReplicaStatus]:
    """Every reported replica, by (model, base URL without a trailing slash)."""
    statuses = {}
    for path in engine_status_dir(home).glob("*.json"):
        try:
            status = msgspec.json.decode(path.read_bytes(), type=ReplicaStatus)
        except (OSError, msgspec.DecodeError):
            continue  # removed meanwhile, or not ours
        statuses[(status.model, status.base_url.rstrip("/"))] = status
    return statuses
