"""Which upstream HTTP client and event loop the gateway should use, by measurement.

Runs the bare pass-through (bench/passthrough.py) with each client and loop against the
fixed-response upstream and reports non-streaming throughput at concurrency 64 and
latency at concurrency 1. Clients that are not installed are skipped; the alternatives
are not dependencies of the appliance: pip install httpx aiosonic pyreqwest.
Usage: .venv/bin/python bench/choose_client.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import MESSAGES, PY, free_port, spawn, wait_until, wrk  # noqa: E402

CLIENTS = ("aiohttp", "pyreqwest", "aiosonic", "httpx")
LOOPS = ("uvloop", "asyncio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="appliance-choose-"))
    upstream_port = free_port()
    upstream = spawn([PY, "bench/fixed_upstream.py", str(upstream_port)], work / "upstream.log")
    body = {"model": "fixed", "messages": MESSAGES, "max_tokens": 16}
    print("| client | loop | req/s at c=64 | p50 ms at c=1 |\n|---|---|---|---|")
    try:
        wait_until(f"http://127.0.0.1:{upstream_port}/v1/models")
        for client in CLIENTS:
            if importlib.util.find_spec(client) is None:
                print(f"| {client} | - | not installed | |")
                continue
            for loop in LOOPS:
                port = free_port()
                proc = spawn(
                    [PY, "-m", "granian", "--interface", "asgi", "bench.passthrough:app", "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1", "--loop", loop, "--no-ws", "--log-level", "warning"],
                    work / f"{client}-{loop}.log",
                    env={"PASSTHROUGH_CLIENT": client, "PASSTHROUGH_UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1"},
                )
                try:
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    wait_until(f"http://127.0.0.1:{port}/v1/models")  # forwarded as a POST; answers 200
                    wrk(url, body, None, 1, 1, work)  # warm up
                    busy = wrk(url, body, None, 64, args.seconds, work)
                    single = wrk(url, body, None, 1, args.seconds, work)
                    print(f"| {client} | {loop} | {busy['rps']:.0f} | {single['p50_us'] / 1000:.2f} |", flush=True)
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
    finally:
        os.killpg(upstream.pid, signal.SIGTERM)
        upstream.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
