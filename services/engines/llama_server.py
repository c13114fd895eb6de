"""Runs llama.cpp's server, `llama-server`, from the portable build this environment
installed (the appliance-llama-server package, built by installer/llama_build.py).

It execs the binary in this same process, so signals and exit statuses are the server's
own; engines start as `python -m services.engines.llama_server ...`, and the systemd and
k3s renderers need only know where Python is. The server keeps this process's environment,
where its key is (LLAMA_API_KEY, never an argument: see services/engines/commands.py).
"""

from __future__ import annotations

import os
import sys

from appliance_llama_server import binary


def main() -> None:
    server = str(binary())
    os.execv(server, [server, *sys.argv[1:]])


if __name__ == "__main__":
    main()
