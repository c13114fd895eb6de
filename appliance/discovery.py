"""How a client on the gateway's own machine finds it: the home records the URL it serves on.

`appliance up` writes it once the gateway answers and removes it on a clean stop; a
bare-metal install writes it beside the admin key. A gateway listening on every
interface (0.0.0.0 or ::) is reached on loopback.
"""

from __future__ import annotations

import os
from pathlib import Path

from appliance.home import gateway_url_path

WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def local_url(host: str, port: int) -> str:
    """The base URL at which this machine reaches a gateway listening on host:port."""
    host = WILDCARD_LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_gateway_url(home: Path, host: str, port: int) -> None:
    path = gateway_url_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(local_url(host, port) + "\n")
    os.replace(tmp, path)


def clear_gateway_url(home: Path) -> None:
    gateway_url_path(home).unlink(missing_ok=True)


def running_gateway_url(home: Path) -> str | None:
    """The URL recorded in the home, or None when no gateway serves it (or it cannot be read)."""
    try:
        return gateway_url_path(home).read_text().strip() or None
    except OSError:
        return None
