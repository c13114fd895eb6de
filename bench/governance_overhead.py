"""What governance costs on the hot path: one gateway, two keys, side by side in one run.

  plain     a key with no limits and no policy (the gateway skips the governor and the
            policy engine for it)
  governed  a key with rpm, tpm, max_parallel and token and cost budgets (all far above
            what the run uses, so every request is counted but none refused), in a team
            with its own limits and budgets, whose policy masks every PII detector; the
            message is plain's, with nothing to mask
  masking   the governed key, with a message (as long) in Korean and English that holds a
            phone number, masked in every request

both against the fixed-response upstream (bench/fixed_upstream.py) through the gateway,
non-streaming and streaming, at concurrency 1 and 64, with wrk. The targets take turns
within each round, in reverse order every other round (so a drift of the shared machine
favours none); the table gives the median of each round's ratio to plain, for throughput
and for the gateway worker's CPU time per request (user + system, all its threads, from
/proc: steadier than throughput where the machine is shared). With two CPUs or more, the
gateway runs on the first alone and wrk and the upstream on the others (taskset), so the
worker measured does not compete with its own load.
Usage:
  .venv/bin/python bench/governance_overhead.py [--seconds 3] [--rounds 12] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from gateway_overhead import BIN, PY, free_port, spawn, stop, wait_until, wrk

MODEL = "fixed"
PLAIN_MESSAGE = "What is the capital of France? Answer in one word."
MASKED_MESSAGE = "프랑스의 수도는 어디인가요? 010-1234-5678로 답해 주세요. In one word."
TARGETS = ("plain", "governed", "masking")


def admin_post(root: str, key: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(root + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (every thread), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def gateway_workers(work: Path) -> list[int]:
    """The Granian worker processes of the gateway whose home is under `work` (not its parent)."""
    table = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True).stdout
    granian = [line.split(None, 2) for line in table.splitlines()[1:] if "granian" in line and str(work) in line]
    pids = {int(pid) for pid, _, _ in granian}
    return [int(pid) for pid, ppid, _ in granian if int(ppid) in pids]


def pin() -> list[str]:
    """With two CPUs or more, the gateway gets CPU 0 to itself and this process (so wrk and the
    upstream) the others: the measured worker no longer competes with its own load."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return []
    os.sched_setaffinity(0, cpus[1:])
    return ["taskset", "-c", str(cpus[0])]


def start(work: Path, procs: list[subprocess.Popen], workers: int = 1, gateway_prefix: list[str] | None = None,
          ) -> tuple[str, dict[str, str]]:
    """The fixed upstream and an appliance in `work` (their processes appended to `procs`, for `stop`),
    with the bench team and the plain and governed keys: the gateway's root URL and the keys."""
    upstream_port, gateway_port = free_port(), free_port()
    (work / "profile.yaml").write_text(f"""name: bench
gateway:
  workers: {workers}
models:
  - name: {MODEL}
    engine: remote
    base_url: http://127.0.0.1:{upstream_port}/v1
    price_input_per_million: 0.5
    price_output_per_million: 1.5
""")
    procs.append(spawn([PY, "bench/fixed_upstream.py", str(upstream_port)], work / "upstream.log"))
    procs.append(spawn([*(gateway_prefix or []), str(BIN / "appliance"), "up", "--profile", str(work / "profile.yaml"),
                        "--home", str(work / "home"), "--host", "127.0.0.1", "--port", str(gateway_port)],
                       work / "appliance.log"))
    root = f"http://127.0.0.1:{gateway_port}"
    wait_until(f"{root}/readyz")
    admin_key = (work / "home" / "admin.key").read_text().strip()
    plenty = {"rpm": 10**9, "tpm": 10**12, "max_parallel": 10**6, "budget_tokens": 10**15,
              "budget_cost": 10**12, "period": "month"}
    admin_post(root, admin_key, "/admin/teams", {"name": "bench", "pii": {"*": "mask"}, **plenty})
    keys = {"governed": admin_post(root, admin_key, "/admin/keys", {"name": "governed", "team": "bench", **plenty})["key"],
            "plain": admin_post(root, admin_key, "/admin/keys", {"name": "plain"})["key"]}
    wait_until(f"{root}/v1/models", headers={"Authorization": f"Bearer {keys['governed']}"})
    return root, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", default="1,64", type=lambda v: tuple(int(c) for c in v.split(",")))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench needs wrk: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="appliance-governance-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        root, keys = start(work, procs, args.workers, pin())
        plain, governed = keys["plain"], keys["governed"]
        url = f"{root}/v1/chat/completions"
        workers = gateway_workers(work)
        targets = (("plain", plain, PLAIN_MESSAGE), ("governed", governed, PLAIN_MESSAGE),
                   ("masking", governed, MASKED_MESSAGE))
        rows = []
        for stream in (False, True):
            for concurrency in args.concurrency:
                for round_ in range(args.rounds):
                    for name, key, message in targets if round_ % 2 == 0 else reversed(targets):
                        body = {"model": MODEL, "messages": [{"role": "user", "content": message}], "max_tokens": 16,
                                "stream": stream}
                        before = cpu_seconds(workers)
                        result = wrk(url, body, key, concurrency, args.seconds, work)
                        result["cpu_us"] = (cpu_seconds(workers) - before) / max(result["requests"], 1) * 1e6
                        rows.append({"stream": stream, "concurrency": concurrency, "target": name, "round": round_,
                                     **result})
                        print(f"stream={stream!s:5} c={concurrency:<3} {name:8} {result['rps']:9.1f} req/s  "
                              f"p50 {result['p50_us'] / 1000:7.2f} ms  p99 {result['p99_us'] / 1000:7.2f} ms  "
                              f"cpu {result['cpu_us']:6.1f} us/req  "
                              f"errors {result['socket_errors'] + result['non2xx']}", flush=True)
        print("\n" + table(rows, args.concurrency))
    finally:
        stop(procs, work)


def table(rows: list[dict], concurrency: tuple[int, ...]) -> str:
    lines = ["| stream | conc. | target | req/s | /plain | p50 ms | added p50 ms | p99 ms | worker CPU µs/req | plain/this CPU | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stream in (False, True):
        for c in concurrency:
            runs = {name: [r for r in rows if (r["stream"], r["concurrency"], r["target"]) == (stream, c, name)]
                    for name in TARGETS}
            plain = runs["plain"]
            for name in TARGETS:
                these = runs[name]
                ratio = statistics.median(b["rps"] / a["rps"] for a, b in zip(plain, these))
                added = statistics.median(b["p50_us"] - a["p50_us"] for a, b in zip(plain, these)) / 1000
                cpu_ratio = statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in zip(plain, these))
                lines.append(f"| {'yes' if stream else 'no'} | {c} | {name} | {statistics.median(r['rps'] for r in these):.0f} "
                             f"| {ratio:.1%} | {statistics.median(r['p50_us'] for r in these) / 1000:.2f} | {added:.2f} "
                             f"| {statistics.median(r['p99_us'] for r in these) / 1000:.2f} "
                             f"| {statistics.median(r['cpu_us'] for r in these):.0f} | {cpu_ratio:.1%} "
                             f"| {sum(r['socket_errors'] + r['non2xx'] for r in these)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
