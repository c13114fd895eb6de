"""What observability costs on the hot path: two gateways side by side in one run.

  off  an appliance as shipped: metrics (nobody scrapes them), no tracing, no request logs
  on   the same appliance with everything on: Prometheus's scrape of /metrics every second
       (GPU, engine, job, backup and budget readings included), OpenTelemetry tracing of
       every request exported over OTLP/HTTP to a collector on loopback (a sink that
       answers 200), and the key's team logging every request and answer (masked)

both serving the fixed-response upstream (bench/fixed_upstream.py), non-streaming and
streaming, with wrk at --concurrency (64). The two take turns within each round, in
reverse order every other round; the table gives the median of each round's ratio of on
to off, for throughput and for the gateway worker's CPU time per request. With two CPUs or
more, both gateways run on the first (one is loaded at a time) and wrk, the upstreams, the
scraper, the sink and the `on` gateway's telemetry helper (services/telemetry, which makes
and exports its spans and masks and writes its logs) on the others; the helper's CPU time
per request is shown beside the worker's. Target: `on` keeps at least 90% of `off`'s throughput.
Usage:
  .venv/bin/python bench/observability_overhead.py [--seconds 3] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from aiohttp import web

from gateway_overhead import BIN, PY, free_port, spawn, stop, wait_until, wrk
from governance_overhead import admin_post, cpu_seconds, gateway_workers, pin

MODEL = "fixed"
MESSAGE = "What is the capital of France? Answer in one word."
TARGET = 0.90
PARTS = ("scrape", "tracing", "logs")


def start_sink() -> int:
    """An OTLP/HTTP collector that takes every export and keeps nothing (aiohttp, on a thread
    of its own: the bench's other CPU, which wrk and the upstream share, must not be its
    bottleneck). Returns its port."""
    port, ready = free_port(), threading.Event()

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/traces", take)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(10)
    return port


def scrape_every_second(url: str, stopping: threading.Event) -> None:
    while not stopping.wait(1.0):
        try:
            urllib.request.urlopen(url, timeout=10).read()
        except OSError:
            pass


def start(work: Path, procs: list, prefix: list[str], on: set[str], sink: str) -> tuple[str, str]:
    """An appliance in `work` with the fixed upstream: its root URL and a key (of a team that logs, with `logs` on)."""
    work.mkdir()
    upstream_port, gateway_port = free_port(), free_port()
    tracing = f"tracing:\n  otlp_endpoint: {sink}\n" if "tracing" in on else ""
    (work / "profile.yaml").write_text(f"""name: bench-{work.name}
models:
  - name: {MODEL}
    engine: remote
    base_url: http://127.0.0.1:{upstream_port}/v1
{tracing}""")
    procs.append(spawn([PY, "bench/fixed_upstream.py", str(upstream_port)], work / "upstream.log"))
    procs.append(spawn([*prefix, str(BIN / "appliance"), "up", "--profile", str(work / "profile.yaml"),
                        "--home", str(work / "home"), "--host", "127.0.0.1", "--port", str(gateway_port)],
                       work / "appliance.log"))
    root = f"http://127.0.0.1:{gateway_port}"
    wait_until(f"{root}/readyz")
    admin_key = (work / "home" / "admin.key").read_text().strip()
    admin_post(root, admin_key, "/admin/teams", {"name": "bench", "log_requests": "logs" in on})
    key = admin_post(root, admin_key, "/admin/keys", {"name": "bench", "team": "bench"})["key"]
    wait_until(f"{root}/v1/models", headers={"Authorization": f"Bearer {key}"})
    return root, key


def start_helpers(root: str, key: str, workers: list[int]) -> list[int]:
    """One request, so that the gateway's telemetry helpers start: their pids, moved to this
    process's CPUs (off the gateway's)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 16}).encode()
    urllib.request.urlopen(urllib.request.Request(
        f"{root}/v1/chat/completions", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}),
        timeout=30).read()
    for _ in range(50):
        table = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True).stdout
        helpers = [int(pid) for pid, ppid, args in (line.split(None, 2) for line in table.splitlines()[1:])
                   if int(ppid) in workers and "services.telemetry" in args]
        if helpers:
            for pid in helpers:
                os.sched_setaffinity(pid, os.sched_getaffinity(0))
            return helpers
        time.sleep(0.1)
    sys.exit("the gateway's telemetry helper did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--on", default=",".join(PARTS), type=lambda v: set(v.split(",")),
                        help=f"what `on` has on, of {', '.join(PARTS)} (to see what each costs)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench needs wrk: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="appliance-observability-bench-"))
    procs: list = []
    prefix = pin()
    sink = start_sink()
    stopping = threading.Event()
    try:
        gateways = {}
        for name in ("off", "on"):
            root, key = start(work / name, procs, prefix, args.on if name == "on" else set(),
                              f"http://127.0.0.1:{sink}")
            workers = gateway_workers(work / name)
            helpers = start_helpers(root, key, workers) if name == "on" and args.on & {"tracing", "logs"} else []
            gateways[name] = (root, key, workers, helpers)
        if "scrape" in args.on:
            threading.Thread(target=scrape_every_second, args=(gateways["on"][0] + "/metrics", stopping),
                             daemon=True).start()
        rows = []
        for stream in (False, True):
            body = {"model": MODEL, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 16, "stream": stream}
            for round_ in range(args.rounds):
                for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    root, key, workers, helpers = gateways[name]
                    before, helped = cpu_seconds(workers), cpu_seconds(helpers)
                    result = wrk(f"{root}/v1/chat/completions", body, key, args.concurrency, args.seconds, work)
                    result["cpu_us"] = (cpu_seconds(workers) - before) / max(result["requests"], 1) * 1e6
                    result["helper_us"] = (cpu_seconds(helpers) - helped) / max(result["requests"], 1) * 1e6
                    rows.append({"stream": stream, "target": name, **result})
                    print(f"stream={stream!s:5} {name:3} {result['rps']:9.1f} req/s  p50 {result['p50_us'] / 1000:7.2f} ms  "
                          f"p99 {result['p99_us'] / 1000:7.2f} ms  cpu {result['cpu_us']:6.1f} us/req  "
                          f"helper {result['helper_us']:6.1f} us/req  "
                          f"errors {result['socket_errors'] + result['non2xx']}", flush=True)
        print("\n" + table(rows, args.concurrency))
    finally:
        stopping.set()
        stop(procs, work)


def table(rows: list[dict], concurrency: int) -> str:
    lines = ["| stream | conc. | req/s off | req/s on | on/off | p50 ms off | p50 ms on | worker CPU µs/req off | on |"
             " off/on CPU | helper CPU µs/req | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for stream in (False, True):
        off = [r for r in rows if r["stream"] == stream and r["target"] == "off"]
        on = [r for r in rows if r["stream"] == stream and r["target"] == "on"]
        ratio = statistics.median(b["rps"] / a["rps"] for a, b in zip(off, on))
        cpu = statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in zip(off, on))
        lines.append(
            f"| {'yes' if stream else 'no'} | {concurrency} | {statistics.median(r['rps'] for r in off):.0f} "
            f"| {statistics.median(r['rps'] for r in on):.0f} | {ratio:.1%} "
            f"| {statistics.median(r['p50_us'] for r in off) / 1000:.2f} | {statistics.median(r['p50_us'] for r in on) / 1000:.2f} "
            f"| {statistics.median(r['cpu_us'] for r in off):.0f} | {statistics.median(r['cpu_us'] for r in on):.0f} "
            f"| {cpu:.1%} | {statistics.median(r['helper_us'] for r in on):.0f} | {sum(r['socket_errors'] + r['non2xx'] for r in off + on)} |"
            + ("" if ratio >= TARGET else f"  below the {TARGET:.0%} target"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
