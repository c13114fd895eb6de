"""Where the appliance keeps its state: $APPLIANCE_HOME and the files inside it."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "APPLIANCE_HOME"
RUNTIME_ENV = "APPLIANCE_GATEWAY_RUNTIME"  # the gateway's runtime file, for the processes that read it
STATE_DB = "state.db"
JOBS_DB = "jobs.db"  # Huey's queue (services/worker)
DATABASES = (STATE_DB, JOBS_DB)  # both replicated by Litestream, restored together


def resolve_home(explicit: str | os.PathLike | None = None) -> Path:
    """--home, else $APPLIANCE_HOME, else ./var."""
    raw = explicit or os.environ.get(HOME_ENV) or "var"
    return Path(raw).expanduser().resolve()


def state_db_path(home: Path) -> Path:
    return home / STATE_DB


def jobs_db_path(home: Path) -> Path:
    return home / JOBS_DB


def admin_key_path(home: Path) -> Path:
    return home / "admin.key"


def run_dir(home: Path) -> Path:
    """Runtime files of the current `appliance up` (gateway config, pid files)."""
    return home / "run"


def gateway_url_path(home: Path) -> Path:
    """The URL of the gateway serving this home, for the CLI on the same machine (appliance.discovery)."""
    return run_dir(home) / "gateway.url"


def engine_status_dir(home: Path) -> Path:
    """One JSON file per engine replica: its state and why it died or failed (services/engines/status.py)."""
    return run_dir(home) / "engines"


def gpu_readings_path(home: Path) -> Path:
    """The GPUs' last reading, written by a GPU sampler for a gateway without the devices (services/gpus.py)."""
    return run_dir(home) / "gpus.json"


def gateway_runtime_path(home: Path) -> Path:
    """The gateway's runtime file (services/gateway/runtime.py), written by `appliance up`."""
    return run_dir(home) / "gateway.json"


def metrics_dir(home: Path) -> Path:
    """Prometheus' multiprocess files, when the gateway runs several workers."""
    return run_dir(home) / "metrics"


def gateway_socket_path(home: Path) -> Path:
    """Granian's Unix socket; only the gateway's door (services/gateway/door.py) connects to it."""
    return run_dir(home) / "gateway.sock"


def litestream_config_path(home: Path) -> Path:
    return run_dir(home) / "litestream.yml"


def litestream_socket_path(home: Path) -> Path:
    return run_dir(home) / "litestream.sock"


def ledger_dir(home: Path) -> Path:
    """The gateway workers' shared counters of limits and budgets (appliance/limits.py, LMDB);
    rebuilt from the usage rows when lost, so it is not backed up."""
    return home / "ledger"


def usage_journal_dir(home: Path) -> Path:
    """Usage rows not yet in the state database, one append-only segment per gateway worker (appliance/usage.py)."""
    return home / "usage-journal"


def logs_dir(home: Path) -> Path:
    return home / "logs"


def log_path(home: Path, process: str) -> Path:
    """The log of one process of the stack: gateway, worker, minio, litestream, engine-<model>-<replica>."""
    return logs_dir(home) / f"{process}.log"


def models_cache_dir(home: Path) -> Path:
    """Model versions fetched from the object store for the engines that serve them."""
    return home / "models"


def cache_dir(home: Path, kind: str) -> Path:
    """Registry files fetched for reading (datasets for diffs, splits, masking), by kind."""
    return home / "cache" / kind


def tmp_dir(home: Path) -> Path:
    """Uploads being received, on the same file system as the home."""
    return home / "tmp"


def blobs_dir(home: Path) -> Path:
    """The filesystem object store's folder, unless storage.data_path names another."""
    return home / "blobs"


def minio_data_dir(home: Path) -> Path:
    """The managed MinIO's data folder, unless storage.data_path names another."""
    return home / "objects"
