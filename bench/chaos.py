"""Chaos and load: the gateway's route fallback, retries and circuit breakers against an
upstream told to fail, each scenario checked against the SLOs below (docs/benchmarks.md).

One appliance (`appliance up`, one gateway worker) serves two remote models: `primary`, the
fault-injecting upstream (bench/fault_upstream.py), and `spare`, the fixed upstream
(bench/fixed_upstream.py), behind the route `chat` (target primary, fallback spare); a
breaker opens after 5 failures in a row, for OPEN_S. Each scenario sends open-loop load to
`chat` for --seconds (requests at fixed times, each sent whatever the earlier ones are
waiting for), with the primary's faults set through its POST /faults:
  baseline    no faults, --rate requests/s
  spike       --spike times the rate for the middle fifth of the run
  delay       the primary answers 0.2 s later, plus or minus 0.1 s
  errors      the primary answers 20% of requests with 500
  drops       the primary drops 20% of connections before answering
  drop-all    the primary drops every connection before answering (its health check still
              passes: only the breaker can keep requests off it)
  stream-cut  streamed requests; the primary cuts 20% of streams after their first chunk
              (the client gets an error event: those requests fail, as they must)
  down        the primary refuses connections
  recovery    the primary is down for the first half, then up again
  outage      the primary answers every request 500 for the first half (its health check
              still passes: only the breaker keeps requests off it), then heals
Per scenario: requests, success rate (200 and, streamed, a complete stream), p50 and p99
latency of all requests from the time each was due, 429/503 answers and requests shed by the
gateway's queue, answers by the fallback, retries and retries refused by the budget (deltas
of the gateway's metrics), the primary's breaker states seen (polled from /readyz) and, with
a heal, seconds from the heal until the primary answers again. Between scenarios the faults
are cleared, the primary answers again and the retry budget fills up. Exits 1 if an SLO is
missed.
Usage:
  .venv/bin/python bench/chaos.py [--seconds 20] [--rate 20] [--spike 8] [--only NAME,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway_overhead import BIN, PY, free_port, spawn, stop, wait_until

OPEN_S = 2.0  # gateway.breaker.open_s: short, so a scenario shows the breaker closing again
HEALED_BY_S = OPEN_S + 2  # a heal is seen within open_s (the breaker's trial) and a health check or two
REFILL_S = 5  # the gateway's retry budget refills from empty (10 retries at min_per_s, 2 a second)
CUT, DELAY, ERRORS, DROPS = 0.2, 0.2, 0.2, 0.2
SCENARIOS = {  # name: (the primary's faults, streamed, share of the run after which they are cleared)
    "baseline": ({}, False, None),
    "spike": ({}, False, None),
    "delay": ({"delay_s": DELAY, "jitter_s": DELAY / 2}, False, None),
    "errors": ({"error_rate": ERRORS}, False, None),
    "drops": ({"drop_rate": DROPS}, False, None),
    "drop-all": ({"drop_rate": 1.0}, False, None),
    "stream-cut": ({"cut_rate": CUT}, True, None),
    "down": ({"down": True}, False, None),
    "recovery": ({"down": True}, False, 0.5),
    "outage": ({"error_rate": 1.0}, False, 0.5),
}
NO_FAULTS = {"delay_s": 0, "jitter_s": 0, "error_rate": 0, "drop_rate": 0, "cut_rate": 0, "down": False}
# What each scenario must show. success: the least share of requests answered in full; p99_s:
# the most p99 latency, in seconds (generous: a shared 2-core VM); only_cuts: every failed
# request is a stream the primary cut, the others are unaffected; breaker_end: the primary's
# breaker when the run ends; breaker_opened: it opened during the run; healed_s: the most
# seconds from the heal until the primary answers again.
SLOS = {
    "baseline": {"success": 0.999, "p99_s": 0.25, "breaker_end": "closed"},
    "spike": {"success": 0.999, "p99_s": 1.0, "breaker_end": "closed"},
    "delay": {"success": 0.999, "p99_s": DELAY * 1.5 + 0.3},
    "errors": {"success": 0.99, "p99_s": 0.5},
    "drops": {"success": 0.99, "p99_s": 0.5},
    "drop-all": {"success": 0.99, "p99_s": 0.5, "breaker_opened": True},
    "stream-cut": {"only_cuts": True, "p99_s": 0.5, "breaker_end": "closed"},
    "down": {"success": 0.99, "p99_s": 0.5},
    "recovery": {"success": 0.99, "p99_s": 0.5, "healed_s": HEALED_BY_S, "breaker_end": "closed"},
    "outage": {"success": 0.99, "p99_s": 0.5, "breaker_opened": True, "healed_s": HEALED_BY_S,
               "breaker_end": "closed"},
}
ERROR_EVENT = re.compile(rb'^data: ?\{"error"', re.M)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def schedule(seconds: float, rate: float, spike: float) -> list[float]:
    """When each request is due, from the run's start; `spike` times the rate in the middle fifth."""
    due, at = [], 0.0
    while at < seconds:
        due.append(at)
        at += 1 / (rate * (spike if 0.4 * seconds <= at < 0.6 * seconds else 1))
    return due


class Stack:
    """The two upstreams and the appliance, and what a scenario asks of them."""

    def __init__(self, work: Path, procs: list[subprocess.Popen]):
        primary, control, spare, gateway = free_port(), free_port(), free_port(), free_port()
        (work / "profile.yaml").write_text(f"""name: chaos
gateway:
  breaker: {{failures: 5, open_s: {OPEN_S}}}
models:
  - name: primary
    engine: remote
    base_url: http://127.0.0.1:{primary}/v1
  - name: spare
    engine: remote
    base_url: http://127.0.0.1:{spare}/v1
routes:
  - name: chat
    targets: [{{model: primary}}]
    fallbacks: [spare]
""")
        procs.append(spawn([PY, "bench/fault_upstream.py", str(primary), "--control-port", str(control)],
                           work / "primary.log"))
        procs.append(spawn([PY, "bench/fixed_upstream.py", str(spare)], work / "spare.log"))
        procs.append(spawn([str(BIN / "appliance"), "up", "--profile", str(work / "profile.yaml"), "--home",
                            str(work / "home"), "--host", "127.0.0.1", "--port", str(gateway)], work / "appliance.log"))
        self.root, self.control = f"http://127.0.0.1:{gateway}", f"http://127.0.0.1:{control}"
        wait_until(f"{self.root}/readyz")
        self.headers = {"Authorization": f"Bearer {(work / 'home' / 'admin.key').read_text().strip()}"}

    async def faults(self, session: aiohttp.ClientSession, faults: dict) -> None:
        async with session.post(f"{self.control}/faults", json={**NO_FAULTS, **faults}) as answer:
            answer.raise_for_status()

    async def primary_stats(self, session: aiohttp.ClientSession) -> collections.Counter:
        async with session.get(f"{self.control}/stats") as answer:
            return collections.Counter(await answer.json())

    async def metrics(self, session: aiohttp.ClientSession) -> dict[tuple, float]:
        async with session.get(f"{self.root}/metrics", headers=self.headers) as answer:
            text = await answer.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def breaker(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"{self.root}/readyz", headers=self.headers) as answer:
            return (await answer.json())["models"]["primary"]["engines"][0]["breaker"]

    async def ask(self, session: aiohttp.ClientSession, stream: bool, due: float) -> dict:
        """One request to the route, sent at `due` (loop time): what came of it."""
        await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
        body = {"model": "chat", "messages": MESSAGES, "max_tokens": 16, "stream": stream}
        outcome = {"due": due, "status": 0, "model": None, "ok": False, "cut": False}
        try:
            async with session.post(f"{self.root}/v1/chat/completions", json=body, headers=self.headers) as answer:
                data = await answer.read()
                outcome |= {"status": answer.status, "model": answer.headers.get("x-appliance-model")}
                outcome["cut"] = answer.status == 200 and stream and bool(ERROR_EVENT.search(data))
                outcome["ok"] = answer.status == 200 and not outcome["cut"] and (
                    not stream or data.rstrip().endswith(b"data: [DONE]"))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass
        outcome["latency"] = asyncio.get_running_loop().time() - due
        return outcome

    async def settle(self, session: aiohttp.ClientSession) -> None:
        """No faults, the primary answering the route again with its breaker closed, and a full
        retry budget (a scenario that spent it would leave the next one none)."""
        await self.faults(session, {})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            outcome = await self.ask(session, False, 0)
            if outcome["model"] == "primary" and await self.breaker(session) == "closed":
                await asyncio.sleep(REFILL_S)
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the primary did not answer again within 30 s")


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    """How much the samples of `name` with these labels grew."""
    def total(samples: dict) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())
    return total(after) - total(before)


async def run(stack: Stack, session: aiohttp.ClientSession, name: str, seconds: float, rate: float,
              spike: float) -> dict:
    faults, stream, heal_at = SCENARIOS[name]
    await stack.settle(session)
    before, primary_before = await stack.metrics(session), await stack.primary_stats(session)
    await stack.faults(session, faults)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    states: list[str] = []

    async def watch() -> None:
        while True:
            state = await stack.breaker(session)
            if not states or states[-1] != state:
                states.append(state)
            await asyncio.sleep(0.1)

    async def heal() -> float:
        await asyncio.sleep(start + heal_at * seconds - loop.time())
        await stack.faults(session, {})
        return loop.time() - start

    watcher = asyncio.create_task(watch())
    healing = asyncio.create_task(heal()) if heal_at is not None else None
    due = schedule(seconds, rate, spike if name == "spike" else 1)
    outcomes = await asyncio.gather(*(stack.ask(session, stream, start + at) for at in due))
    healed = await healing if healing else None
    await asyncio.sleep(0.2)
    watcher.cancel()
    after, primary_after = await stack.metrics(session), await stack.primary_stats(session)
    latencies = sorted(o["latency"] for o in outcomes)
    failures = collections.Counter("cut" if o["cut"] else str(o["status"] or "connection")
                                   for o in outcomes if not o["ok"])
    result = {
        "scenario": name, "faults": faults, "stream": stream, "requests": len(outcomes),
        "success": sum(o["ok"] for o in outcomes) / len(outcomes),
        "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "failures": dict(failures),
        "answers_429_503": sum(o["status"] in (429, 503) for o in outcomes),
        "shed": delta(after, before, "appliance_shed_total"),
        "fallbacks": delta(after, before, "appliance_route_requests_total", route="chat", fallback="yes"),
        "retries": delta(after, before, "appliance_retries_total"),
        "retries_refused": delta(after, before, "appliance_retries_refused_total"),
        "upstream_failures": delta(after, before, "appliance_upstream_failures_total", model="primary"),
        "primary": dict(primary_after - primary_before),
        "breaker_states": states,
        "healed_at_s": healed,
        "healed_s": None,
    }
    if healed is not None:
        back = [o["due"] - start for o in outcomes if o["ok"] and o["model"] == "primary" and o["due"] - start >= healed]
        result["healed_s"] = min(back) - healed if back else None
    result["missed"] = missed(result, SLOS[name])
    return result


def missed(result: dict, slo: dict) -> list[str]:
    """The SLOs the result does not meet, each in words."""
    out = []
    if "success" in slo and result["success"] < slo["success"]:
        out.append(f"success {result['success']:.2%} < {slo['success']:.1%}")
    if "p99_s" in slo and result["p99_s"] > slo["p99_s"]:
        out.append(f"p99 {result['p99_s'] * 1000:.0f} ms > {slo['p99_s'] * 1000:.0f} ms")
    if slo.get("only_cuts") and (set(result["failures"]) - {"cut"} or result["failures"].get("cut", 0)
                                 != result["primary"].get("cut", 0)):
        out.append(f"failures {result['failures']} are not just the {result['primary'].get('cut', 0)} cut streams")
    if "breaker_end" in slo and result["breaker_states"][-1:] != [slo["breaker_end"]]:
        out.append(f"breaker ended {result['breaker_states'][-1:]}, not {slo['breaker_end']}")
    if slo.get("breaker_opened") and "open" not in result["breaker_states"]:
        out.append("breaker never opened")
    if "healed_s" in slo and (result["healed_s"] is None or result["healed_s"] > slo["healed_s"]):
        out.append(f"primary answered {result['healed_s']} s after the heal, not within {slo['healed_s']:g} s")
    return out


def table(results: list[dict]) -> str:
    lines = ["| scenario | requests | success | p50 ms | p99 ms | 429/503 | shed | fallbacks | retries | refused "
             "| breaker | healed after s | SLO |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        healed = f"{r['healed_s']:.1f}" if r["healed_s"] is not None else "-"
        lines.append(f"| {r['scenario']} | {r['requests']} | {r['success']:.2%} | {r['p50_s'] * 1000:.1f} "
                     f"| {r['p99_s'] * 1000:.1f} | {r['answers_429_503']} | {r['shed']:.0f} | {r['fallbacks']:.0f} "
                     f"| {r['retries']:.0f} | {r['retries_refused']:.0f} | {' → '.join(r['breaker_states'])} "
                     f"| {healed} | {'met' if not r['missed'] else 'MISSED: ' + '; '.join(r['missed'])} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, stack: Stack) -> list[dict]:
    results = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        for name in args.only:
            result = await run(stack, session, name, args.seconds, args.rate, args.spike)
            results.append(result)
            print(f"{name:10} {result['requests']:5} requests  success {result['success']:.2%}  "
                  f"p50 {result['p50_s'] * 1000:.1f} ms  p99 {result['p99_s'] * 1000:.1f} ms  "
                  f"failures {result['failures']}  primary {result['primary']}  "
                  f"{'SLO met' if not result['missed'] else 'MISSED ' + '; '.join(result['missed'])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="length of each scenario")
    parser.add_argument("--rate", type=float, default=20, help="requests per second, outside the spike")
    parser.add_argument("--spike", type=float, default=8, help="the spike's rate, times --rate")
    parser.add_argument("--only", default=",".join(SCENARIOS), type=lambda v: v.split(","),
                        help=f"comma-separated scenarios, of {', '.join(SCENARIOS)}")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if unknown := set(args.only) - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="appliance-chaos-"))
    procs: list[subprocess.Popen] = []
    try:
        results = asyncio.run(main_async(args, Stack(work, procs)))
    finally:
        stop(procs, work)
    print("\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "rate": args.rate, "spike": args.spike,
                                         "slos": SLOS, "results": results}, indent=2))
    sys.exit(1 if any(r["missed"] for r in results) else 0)


if __name__ == "__main__":
    main()
