"""Where the appliance keeps its state: $APPLIANCE_HOME and the files inside it."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "APPLIANCE_HOME"


def resolve_home(explicit: str | os.PathLike | None = None) -> Path:
    """--home, else $APPLIANCE_HOME, else ./var."""
    raw = explicit or os.environ.get(HOME_ENV) or "var"
    return Path(raw).expanduser().resolve()


def state_db_path(home: Path) -> Path:
    return home / "state.db"


def admin_key_path(home: Path) -> Path:
    return home / "admin.key"


def run_dir(home: Path) -> Path:
    """Runtime files of the current `appliance up` (gateway config, pid files)."""
    return home / "run"


def logs_dir(home: Path) -> Path:
    return home / "logs"
