"""What governance adds to a request in CPU instructions, counted by valgrind: the same on every run,
where throughput on a shared machine swings by a tenth between runs seconds apart.

It starts the stack of bench/governance_overhead.py (the fixed upstream, an appliance, the plain
and governed keys), then drives the gateway's app (services/gateway/app.py, built from that
appliance's runtime file) in a process of its own under callgrind, through its RSGI entry point:
the requests go through authentication, admission, the policy, the upstream over HTTP and
metering, as in the gateway worker, but not through Granian and the door (the same for both
keys). Each key runs twice, `--short` and `--short + --requests` requests at concurrency 64 after
the same warm-up; the difference over `--requests` is the count per request, start-up cancelling
out. Valgrind runs the code some 50 times slower, so leases (LEASE_S of wall time) are renewed
far more often per request than at full speed: the governed count is a little high.

Needs valgrind (Debian: apt-get install valgrind). Usage:
  .venv/bin/python bench/governance_instructions.py [--requests 2000] [--short 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway_overhead import PY, ROOT, stop
from governance_overhead import MODEL, PLAIN_MESSAGE, start

CONCURRENCY = 64
WARM_UP = 200


class _Protocol:
    """What the gateway's RSGI route uses of Granian's HTTPProtocol, answering from memory."""

    def __init__(self, body: bytes):
        self.body, self.status = body, None

    async def _read(self) -> bytes:
        return self.body

    def __call__(self):
        return self._read()

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration

    def response_bytes(self, status: int, headers: list, body: bytes) -> None:
        self.status = status

    def response_stream(self, status: int, headers: list):
        raise AssertionError("the bench asks for whole answers")

    async def client_disconnect(self) -> None:
        await asyncio.Event().wait()


class _Scope:
    def __init__(self, key: str, length: int):
        self.method, self.path = "POST", "/v1/chat/completions"
        self.headers = {"authorization": f"Bearer {key}", "content-length": str(length)}


def drive(key: str, requests: int) -> None:
    """Under valgrind: the gateway app in this process, WARM_UP and then `requests` chat requests."""
    import uvloop

    from services.gateway.app import create_app

    app = create_app()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    app.__rsgi_init__(loop)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PLAIN_MESSAGE}],
                       "max_tokens": 16}).encode()

    async def run(count: int) -> None:
        left = count

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                proto = _Protocol(body)
                await app.__rsgi__(_Scope(key, len(body)), proto)
                if proto.status != 200:
                    raise SystemExit(f"the gateway answered {proto.status}")

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))

    loop.run_until_complete(_until_healthy(app))
    loop.run_until_complete(run(WARM_UP))
    loop.run_until_complete(run(requests))
    app.__rsgi_del__(loop)


async def _until_healthy(app) -> None:
    """The gateway's first health check of the upstream comes a moment after start."""
    for _ in range(600):
        if not app.gateway.unready_models():
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the upstream never passed the gateway's health check")


def instructions(key: str, requests: int, env: dict, work: Path, name: str) -> int:
    log = work / f"{name}-{requests}.log"
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", PY, __file__, "--drive", key, str(requests)]
    subprocess.run(argv, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, check=True)
    return int(re.search(r"Collected : (\d+)", log.read_text()).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--drive", nargs=2, metavar=("KEY", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive[0], int(args.drive[1]))
        return
    if not shutil.which("valgrind"):
        sys.exit("bench needs valgrind: apt-get install valgrind")
    work = Path(tempfile.mkdtemp(prefix="appliance-governance-instructions-"))
    procs: list[subprocess.Popen] = []
    try:
        _, keys = start(work, procs)
        env = {**os.environ, "APPLIANCE_GATEWAY_RUNTIME": str(work / "home" / "run" / "gateway.json")}
        runs = [(name, n) for name in ("plain", "governed") for n in (args.short, args.short + args.requests)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            counts = dict(zip(runs, pool.map(lambda run: instructions(keys[run[0]], run[1], env, work, run[0]), runs)))
        per = {name: (counts[name, args.short + args.requests] - counts[name, args.short]) / args.requests
               for name in ("plain", "governed")}
        print("| key | instructions per request | /plain |\n|---|---:|---:|")
        for name, count in per.items():
            print(f"| {name} | {count:,.0f} | {count / per['plain']:.1%} |")
        print(f"\ngoverned - plain: {per['governed'] - per['plain']:,.0f} instructions per request")
    finally:
        stop(procs, work)


if __name__ == "__main__":
    main()
