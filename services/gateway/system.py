"""What GET /admin/system reports beyond /readyz, /metrics and /admin/serving: this gateway's
version, start and workers, the machine's GPUs (NVML) and how far the state's replica is
(litestream).

The GPUs come from NVML in the gateway where it has the devices (`appliance up`), else from
the file that a GPU sampler with the devices writes (services/gpus.py), as the runtime says.
Both readings block: NVML calls into the driver (or the sampler's file is read), and
litestream's status runs litestream and reads the replica. Each is taken on a thread and
kept a while, so that many consoles polling cost one reading per interval in each gateway
worker, and the event loop never waits.
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
from services.gateway.launch import STARTED_ENV
from services.gateway.runtime import GatewayRuntime
from services.gpus import read_gpus, read_reading
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


def gpu_source(runtime: GatewayRuntime) -> Callable[[], dict]:
    """How this gateway reads the GPUs: not at all (and why), the sampler's file, or NVML itself."""
    if runtime.no_gpus_reason:
        return lambda: {"gpus": [], "gpu_error": runtime.no_gpus_reason, "gpus_read_at": None}
    if runtime.gpu_readings:
        return partial(read_reading, Path(runtime.gpu_readings))
    return read_gpus


class SystemState:
    """One gateway worker's answer to GET /admin/system."""

    def __init__(self, runtime: GatewayRuntime):
        # launch.py sets the gateway's start; an app made in-process (tests) starts with itself.
        self.started_at = float(os.environ.get(STARTED_ENV) or time.time())
        self.workers = runtime.gateway.workers
        self.gpus = Reading(gpu_source(runtime), GPU_READING_S)
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
