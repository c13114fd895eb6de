"""Usage analytics at scale: the admin API's usage queries (appliance/analytics.py) against
a state database holding --rows usage rows (ten million by default), each under 100 ms.

The rows are made up but shaped like a busy appliance's: --days of traffic, busier in
working hours, from --keys keys (each its user's, users in --teams teams), each key an
application that names one or two targets: a model, or a route that sends most of its
requests to one model and the rest to another (its fallback or canary); 3% errors. What a
query reads grows with the combinations of key, model and route in use each day (here
about 2.5 per key), not with the requests. They go in through
the real writer (appliance/usage.py: journal, batch insert and rollups) in time order, in
batches of 20,000, as a gateway under load would flush them. Each query runs --repeat
times; its median and worst are printed, beside the same query summed from the raw rows
(the way /admin/usage worked before the rollups) for the first few. Exits 1 if a query's
median is over 100 ms.
Usage:
  .venv/bin/python bench/usage_analytics.py [--rows 10000000] [--db FILE] [--repeat 5]
  (an existing --db with enough rows is queried as it is: no rows are added)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.analytics import summarize  # noqa: E402
from appliance.db import open_db  # noqa: E402
from appliance.usage import UsageRecord, UsageRecorder  # noqa: E402

TARGET_MS = 100.0
BATCH = 20_000
MODELS = ("smollm2-135m-instruct", "qwen2.5-7b", "llama3.1-8b", "gemma3-270m", "remote-gpt", "remote-claude")
ROUTES = {"chat": (("qwen2.5-7b", 0.9), ("remote-gpt", 0.1)), "code": (("llama3.1-8b", 0.95), ("remote-claude", 0.05)),
          "summarise": (("gemma3-270m", 0.8), ("smollm2-135m-instruct", 0.2))}
TARGETS = (*MODELS, *ROUTES)


def target_of(rng: random.Random, targets: list[str]) -> tuple[str, str | None]:
    """(model, route) of one request of a key that names `targets`."""
    target = rng.choice(targets)
    if target not in ROUTES:
        return target, None
    (first, share), (second, _) = ROUTES[target]
    return (first if rng.random() < share else second), target


def fill(db_path: Path, rows: int, days: int, keys: int, teams: int) -> float:
    """Write `rows` rows ending now; returns their rate per second."""
    rng = random.Random(1)
    now = time.time()
    start = now - days * 86400
    owners = [(f"key-{k}", f"user-{k}", f"team-{k % teams}", rng.sample(TARGETS, rng.choice((1, 2))))
              for k in range(keys)]
    weights = [1.0 + 3.0 * (8 <= (h + 9) % 24 <= 19) for h in range(24)]  # working hours, KST
    hours = days * 24
    per_hour = [weights[h % 24] for h in range(hours)]
    scale = rows / sum(per_hour)
    recorder = UsageRecorder(db_path, db_path.parent / "journal")
    recorder.open()
    written, began, number = 0, time.perf_counter(), 0
    for hour in range(hours):
        count = round(per_hour[hour] * scale) if hour < hours - 1 else rows - written
        base = start + hour * 3600
        for ts in sorted(base + rng.random() * 3600 for _ in range(count)):
            key, user, team, targets = rng.choice(owners)
            model, route = target_of(rng, targets)
            prompt, completion = rng.randint(10, 2000), rng.randint(1, 500)
            number += 1
            recorder.record(UsageRecord(
                ts=ts, request_id=f"req-{number}", key_id=key, model=model, endpoint="chat/completions",
                stream=rng.random() < 0.5, status=200 if rng.random() > 0.03 else rng.choice((429, 500, 502)),
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                latency_ms=rng.uniform(50, 4000), ttft_ms=rng.uniform(20, 400), user_id=user, team_id=team,
                cost=(prompt + completion) * 1e-6, route=route))
            if recorder.pending >= BATCH:
                asyncio.run(recorder.flush())
        written += count
        if hour % (24 * 7) == 0:
            print(f"  {written:,} rows written", file=sys.stderr)
    asyncio.run(recorder.flush())
    recorder.close()
    return rows / (time.perf_counter() - began)


QUERIES = [  # (what, summarize's arguments)
    ("by key, last 24 hours", {"since": -86400, "by": ("key",)}),
    ("by team and model, last 30 days", {"since": -30 * 86400, "by": ("team", "model")}),
    ("by model, everything", {"by": ("model",)}),
    ("by key and model, last 7 days (from mid-hour)", {"since": -7 * 86400 - 1234.5, "by": ("key", "model")}),
    ("by route, last 30 days, daily", {"since": -30 * 86400, "by": ("route",), "bucket": "day"}),
    ("by model, last 7 days, hourly", {"since": -7 * 86400, "by": ("model",), "bucket": "hour"}),
    ("by team, everything, monthly", {"by": ("team",), "bucket": "month"}),
    ("by team, last 90 days, daily", {"since": -90 * 86400, "by": ("team",), "bucket": "day"}),
    ("by key, last 24 hours, hourly", {"since": -86400, "by": ("key",), "bucket": "hour"}),
    ("one user's own, by key and model, 30 days", {"since": -30 * 86400, "by": ("key", "model"),
                                                   "user_id": "user-7"}),
    ("by template, a closed week two weeks ago", {"since": -21 * 86400 + 77.0, "until": -14 * 86400 + 3.0,
                                                  "by": ("template",)}),
]
RAW_COMPARED = 3  # the first queries also summed from the raw rows, for the ratio


def raw_summary(db, since: float | None, by: tuple[str, ...]) -> int:
    columns = ", ".join(f"{g}_id" if g in ("key", "user", "team") else g for g in by)
    where = "WHERE ts >= ?" if since is not None else ""
    cursor = db.execute(f"SELECT {columns}, count(*), sum(status >= 400), sum(prompt_tokens), sum(completion_tokens), "
                        f"sum(cost), avg(latency_ms), avg(ttft_ms), max(ts) FROM usage {where} GROUP BY {columns}",
                        [since] if since is not None else [])
    return len(cursor.fetchall())


def timed(call, repeat: int) -> tuple[float, float, int]:
    runs, result = [], None
    for _ in range(repeat):
        began = time.perf_counter()
        result = call()
        runs.append((time.perf_counter() - began) * 1000)
    return statistics.median(runs), max(runs), result if isinstance(result, int) else len(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--keys", type=int, default=400)
    parser.add_argument("--teams", type=int, default=20)
    parser.add_argument("--db", type=Path, help="Keep the database here (default: a temporary folder).")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="usage-bench-") as scratch:
        db_path = args.db or Path(scratch) / "state.db"
        db = open_db(db_path)
        have = db.execute("SELECT count(*) FROM usage").fetchone()[0]
        if have < args.rows:
            print(f"writing {args.rows - have:,} usage rows over {args.days} days ...", file=sys.stderr)
            db.conn.close()
            rate = fill(db_path, args.rows - have, args.days, args.keys, args.teams)
            print(f"written at {rate:,.0f} rows/s (journal, batch insert and the five rollups)")
            db = open_db(db_path)
        tables = ("usage", "usage_hourly", "usage_daily", "usage_monthly", "usage_hourly_teams", "usage_daily_teams")
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
        print("rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items())
              + f"; database {db_path.stat().st_size / 2**30:.2f} GiB")
        now = time.time()
        worst = 0.0
        print(f"{'query':52} {'rows':>6} {'median ms':>10} {'max ms':>8} {'raw rows ms':>12}")
        for index, (what, kwargs) in enumerate(QUERIES):
            kwargs = {k: now + v if k in ("since", "until") else v for k, v in kwargs.items()}
            median, slowest, count = timed(lambda: summarize(db, **kwargs), args.repeat)
            raw = ""
            if index < RAW_COMPARED:
                raw = f"{timed(lambda: raw_summary(db, kwargs.get('since'), kwargs['by']), 1)[0]:12.0f}"
            print(f"{what:52} {count:6} {median:10.1f} {slowest:8.1f} {raw:>12}")
            worst = max(worst, median)
        db.conn.close()
    print(f"slowest median {worst:.1f} ms (target {TARGET_MS:.0f} ms): {'ok' if worst <= TARGET_MS else 'MISSED'}")
    return 0 if worst <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
