"""The gateway process: Granian on a Unix socket in the home, behind the door.

`python -m services.gateway.launch --host H --port P --workers N` (services/stack.py's
gateway_argv) reads the runtime file named by APPLIANCE_GATEWAY_RUNTIME, as the gateway
app does, and then becomes Granian (exec: the same process, so the supervisor's and
systemd's signals reach Granian) serving the app on home/run/gateway.sock, mode 0600.
Each Granian worker opens the door on H:P (services/gateway/door.py), passed on in
DOOR_ENV. Granian's header timeout is the profile's, and its backpressure is above the
door's caps, so Granian never stops accepting: the door does the refusing. STARTED_ENV
tells the workers when the gateway started (a worker Granian restarts keeps that time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from appliance.config import GatewayConfig
from appliance.home import RUNTIME_ENV, gateway_socket_path
from services.gateway.door import DOOR_ENV
from services.gateway.runtime import read_runtime

GATEWAY_FACTORY = "services.gateway.app:create_app"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
STARTED_ENV = "APPLIANCE_GATEWAY_STARTED"  # Unix time


def granian_argv(python: str, socket: Path, gateway: GatewayConfig, workers: int) -> list[str]:
    """Granian serving the gateway's RSGI app on `socket`."""
    return [python, "-m", "granian", "--interface", "rsgi", "--factory", GATEWAY_FACTORY,
            "--uds", str(socket), "--uds-permissions", "0600", "--workers", str(workers),
            "--http1-header-read-timeout", str(round(gateway.header_timeout_s * 1000)),
            "--backpressure", str(gateway.max_connections + gateway.reserved_connections),
            "--loop", "uvloop", "--no-ws", "--log-level", "warning"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="services.gateway.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    args = parser.parse_args(argv)
    runtime = read_runtime(Path(os.environ[RUNTIME_ENV]))
    socket = gateway_socket_path(Path(runtime.home))
    if len(str(socket)) > MAX_SOCKET_PATH:
        sys.exit(f"the gateway's socket path {socket} is longer than {MAX_SOCKET_PATH} bytes; use a shorter home")
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)  # left by a gateway that was killed
    os.environ[DOOR_ENV] = f"{args.host}:{args.port}"
    os.environ[STARTED_ENV] = repr(time.time())
    command = granian_argv(sys.executable, socket, runtime.gateway, args.workers)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
