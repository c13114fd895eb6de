"""What GET /admin/system reports beyond /readyz, /metrics and /admin/serving: this gateway's
version, start and workers, the machine's GPUs (NVML) and how far the state's replica is
(litestream).

Both readings block: NVML calls into the driver, and litestream's status runs litestream
and reads the replica. Each is taken on a thread and kept a while, so that many consoles
polling cost one reading per interval in each gateway worker, and the event loop never waits.
(litestream's own /metrics has its local position but not the replica's, so no lag.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Generic, TypeVar

from appliance import __version__
from appliance.errors import ApplianceError
from appliance.home import DATABASES
from appliance.objectstore import ObjectStoreSettings, S3Settings
from appliance.planning.inventory import GpuInfo
from appliance.planning.probe import probe_gpus
from services.gateway.launch import STARTED_ENV
from services.gateway.runtime import GatewayRuntime
from services.storage import litestream

log = logging.getLogger("appliance.gateway")

GPU_READING_S = 2.0  # how long a GPU reading is kept
BACKUP_READING_S = 15.0  # how long a replica status is kept

T = TypeVar("T")


class Reading(Generic[T]):
    """A blocking reading taken on a thread and kept for `keep_s`; callers that come while it
    is taken wait for that one."""

    def __init__(self, read: Callable[[], T], keep_s: float):
        self._read, self._keep_s = read, keep_s
        self._value: T | None = None
        self._taken: float | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        async with self._lock:
            if self._taken is None or time.monotonic() - self._taken >= self._keep_s:
                self._value = await asyncio.to_thread(self._read)
                self._taken = time.monotonic()
            return self._value


def gpu_state(gpu: GpuInfo) -> dict:
    return {"index": gpu.index, "name": gpu.name, "memory_used_bytes": gpu.memory_total_bytes - gpu.memory_free_bytes,
            "memory_total_bytes": gpu.memory_total_bytes, "utilization_percent": gpu.utilization_percent,
            "temperature_c": gpu.temperature_c}


def read_gpus() -> dict:
    """`gpus` and `gpu_error`: why NVML is unavailable, or which GPUs it could not read."""
    nvml, gpus = probe_gpus()
    error = nvml.reason if not nvml.available else "; ".join(nvml.problems) or None
    return {"gpus": [gpu_state(gpu) for gpu in gpus], "gpu_error": error}


def read_backup(config: Path, store: ObjectStoreSettings | None) -> list[dict]:
    """Each replicated database's state and lag; what keeps them from being read is each one's `detail`.

    An S3 replica is always the object store's backups bucket (litestream.backup_target), so the
    store's credentials are litestream's too.
    """
    keys = {"access_key": store.access_key, "secret_key": store.secret_key} if isinstance(store, S3Settings) else {}
    try:
        statuses = litestream.status(config, **keys)
    except ApplianceError as exc:  # no config, no litestream binary, `litestream status` failed
        return _unread(exc.message)
    except Exception as exc:  # an answer of litestream's that status() did not expect
        log.exception("reading the replication status from %s failed", config)
        return _unread(f"{type(exc).__name__}: {exc}")
    return [{"name": Path(s.path).name, "state": s.state, "lag_s": s.lag_s, "lag_transactions": s.lag_transactions,
             "detail": s.detail} for s in statuses]


def _unread(why: str) -> list[dict]:
    """Every replicated database (each deployment replicates them all), its state unknown."""
    return [{"name": name, "state": "unknown", "lag_s": None, "lag_transactions": None,
             "detail": f"cannot read the replication status: {why}"} for name in DATABASES]


class SystemState:
    """One gateway worker's answer to GET /admin/system."""

    def __init__(self, runtime: GatewayRuntime):
        # launch.py sets the gateway's start; an app made in-process (tests) starts with itself.
        self.started_at = float(os.environ.get(STARTED_ENV) or time.time())
        self.workers = runtime.gateway.workers
        self.gpus = Reading(read_gpus, GPU_READING_S)
        self.backup = None
        if runtime.litestream_config:
            self.backup = Reading(partial(read_backup, Path(runtime.litestream_config), runtime.storage),
                                  BACKUP_READING_S)

    async def snapshot(self) -> dict:
        if self.backup is None:
            gpus, backup = await self.gpus.get(), None
        else:
            gpus, backup = await asyncio.gather(self.gpus.get(), self.backup.get())
        return {"version": __version__, "started_at": self.started_at, "uptime_s": time.time() - self.started_at,
                "workers": self.workers, **gpus, "backup": backup}
