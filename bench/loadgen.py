"""A Python load generator (aiohttp on uvloop), the alternative to wrk in gateway_overhead.py.

Each of CONCURRENCY workers sends the same POST over a keep-alive connection as soon as
its previous answer has been read to the end, for SECONDS seconds. Prints one line:
RESULT {"requests", "duration_us", "socket_errors", "non2xx", "p50_us", "p99_us"}.
Usage: python bench/loadgen.py URL BODY_FILE CONCURRENCY SECONDS [KEY]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
import uvloop


async def run(url: str, body: bytes, concurrency: int, seconds: float, key: str | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    latencies: list[float] = []
    errors = {"socket": 0, "status": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            while (begin := time.perf_counter()) < deadline:
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            errors["status"] += 1
                            continue
                except (aiohttp.ClientError, OSError):
                    errors["socket"] += 1
                    continue
                latencies.append(time.perf_counter() - begin)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0  # noqa: E731
    return {
        "requests": len(latencies),
        "duration_us": int(duration * 1e6),
        "socket_errors": errors["socket"],
        "non2xx": errors["status"],
        "p50_us": int(pick(0.50) * 1e6),
        "p99_us": int(pick(0.99) * 1e6),
    }


if __name__ == "__main__":
    url, body_file, concurrency, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    key = sys.argv[5] if len(sys.argv) > 5 else None
    with open(body_file, "rb") as f:
        body = f.read()
    print("RESULT " + json.dumps(uvloop.run(run(url, body, concurrency, seconds, key))))
