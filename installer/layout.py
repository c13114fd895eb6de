"""Where a bare-metal install puts things, optionally under a root directory.

`--root DIR` installs into a directory tree instead of / (tests, image builds): every
path below is then under DIR, while the paths written *into* files (units, configs) stay
the real ones (/opt/appliance/...), as they will be on the machine that boots the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.files import write_new

SERVICE_USER = "appliance"
ENGINE_BASE_PORT = 18100  # engine replica i listens on 127.0.0.1:(ENGINE_BASE_PORT + i)


@dataclass(frozen=True)
class Layout:
    root: Path = Path("/")
    prefix: Path = Path("/opt/appliance")  # the virtual environment: bin/appliance, bin/python, bin/litestream
    etc: Path = Path("/etc/appliance")  # profile.yaml, plan.json, gateway.json and secrets (0600)
    data: Path = Path("/var/lib/appliance")  # APPLIANCE_HOME: state.db, admin.key, models/, logs/
    units: Path = Path("/etc/systemd/system")
    user: str = SERVICE_USER

    def on_disk(self, path: Path) -> Path:
        """Where a target path is in this tree (under --root)."""
        return self.root / path.relative_to("/")

    @property
    def bin(self) -> Path:
        return self.prefix / "bin"

    @property
    def models(self) -> Path:
        return self.data / "models"


def write_if_changed(path: Path, data: bytes, mode: int) -> bool:
    """Write `data` with `mode` atomically unless the file already is exactly that; True when it changed."""
    try:
        if path.read_bytes() == data and path.stat().st_mode & 0o7777 == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new(path, data, mode)
    return True
