"""CPU time per request of the gateway and of the bare pass-throughs, under the same load.

Throughput on a shared 2-core machine swings with whatever else runs; the CPU time a
server process spends per request is far steadier, so this is the measure to compare
changes to the gateway by. Starts the fixed upstream, the bare pass-throughs (Litestar on
ASGI, and RSGI) and the gateway (1 worker each), then alternates wrk runs (concurrency
16, non-streaming) against the three and reads their processes' CPU time (user + system)
around each run. Litestream's CPU time during the gateway's runs is reported on its own,
per gateway request: it replicates the usage rows the gateway writes.
Usage: .venv/bin/python bench/cpu_per_request.py [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import BIN, MESSAGES, PY, free_port, spawn, wait_until, wrk  # noqa: E402


def cpu_seconds(root: psutil.Process) -> float:
    procs = [root, *root.children(recursive=True)]
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs if p.is_running())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="appliance-cpu-"))
    upstream_port, bare_port, rsgi_port, gateway_port = free_port(), free_port(), free_port(), free_port()
    (work / "profile.yaml").write_text(
        f"name: cpu\nmodels:\n  - name: fixed\n    engine: remote\n    base_url: http://127.0.0.1:{upstream_port}/v1\n"
    )
    upstream = spawn([PY, "bench/fixed_upstream.py", str(upstream_port)], work / "upstream.log")
    bare, rsgi = (
        spawn([PY, "-m", "granian", "--interface", interface, f"bench.passthrough:{app}", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning"],
              work / f"{app}.log", env={"PASSTHROUGH_UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1"})
        for interface, app, port in (("asgi", "app", bare_port), ("rsgi", "rsgi_app", rsgi_port))
    )
    stack = spawn([str(BIN / "appliance"), "up", "--profile", str(work / "profile.yaml"), "--home", str(work / "home"),
                   "--host", "127.0.0.1", "--port", str(gateway_port)], work / "appliance.log")
    try:
        wait_until(f"http://127.0.0.1:{upstream_port}/v1/models")
        wait_until(f"http://127.0.0.1:{gateway_port}/readyz")
        key = (work / "home" / "admin.key").read_text().strip()
        children = psutil.Process(stack.pid).children()
        gateway = next(p for p in children if "granian" in " ".join(p.cmdline()))
        litestream = next(p for p in children if "litestream" in p.name())
        body = {"model": "fixed", "messages": MESSAGES, "max_tokens": 16}
        targets = [("bare", f"http://127.0.0.1:{bare_port}/v1/chat/completions", None, psutil.Process(bare.pid)),
                   ("bare-rsgi", f"http://127.0.0.1:{rsgi_port}/v1/chat/completions", None, psutil.Process(rsgi.pid)),
                   ("gateway", f"http://127.0.0.1:{gateway_port}/v1/chat/completions", key, gateway)]
        wrk(targets[0][1], body, None, 1, 1, work)
        results: dict[str, list[float]] = {name: [] for name, *_ in targets} | {"litestream": []}
        for _ in range(args.rounds):
            for name, url, auth, proc in targets:
                before, replicating = cpu_seconds(proc), cpu_seconds(litestream)
                run = wrk(url, body, auth, 16, args.seconds, work)
                per_request = (cpu_seconds(proc) - before) / run["requests"] * 1e6
                results[name].append(per_request)
                line = f"{name:9} {run['rps']:8.0f} req/s  {per_request:6.1f} CPU µs/request"
                if name == "gateway":
                    results["litestream"].append((cpu_seconds(litestream) - replicating) / run["requests"] * 1e6)
                    line += f"  (+ litestream {results['litestream'][-1]:5.1f})"
                print(line, flush=True)
        summary = {name: round(sorted(v)[len(v) // 2], 1) for name, v in results.items()}
        summary["gateway/bare"] = round(summary["gateway"] / summary["bare"], 2)
        summary["gateway/bare-rsgi"] = round(summary["gateway"] / summary["bare-rsgi"], 2)
        print("median " + json.dumps(summary))
    finally:
        for proc in (stack, bare, rsgi, upstream):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in (stack, bare, rsgi, upstream):
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
