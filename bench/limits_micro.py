"""What the governor (appliance/limits.py) costs per request on the event loop: one admit
and one settle for a key with rpm, tpm, max_parallel and budgets and a team with a budget
(two subjects counted per request), all far from their limits, so most requests come from
leases in memory and the ledger is written once per lease; and the same with the ledger's
pages written by plain writes instead of a shared mapping (writemap off). One process, no
contention.
Usage: .venv/bin/python bench/limits_micro.py [--requests 50000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance import limits  # noqa: E402
from appliance.costs import Costs  # noqa: E402
from appliance.governance import Limits, Principal  # noqa: E402

PRINCIPAL = Principal(
    key_id="k1", name="bench", role="developer", team_id="t1",
    limits=Limits(rpm=10**9, tpm=10**12, max_parallel=10**6, budget_tokens=10**15, budget_cost=1e12),
    team_limits=Limits(budget_tokens=10**15, period="day"),
)


def measure(governor: limits.Governor, requests: int) -> dict:
    admit, settle = [], []
    for _ in range(requests):
        t0 = time.perf_counter_ns()
        ticket = governor.admit(PRINCIPAL, "m", worst_tokens=1000, worst_cost=0.01)
        t1 = time.perf_counter_ns()
        governor.settle(ticket, tokens=500, cost=0.005)
        t2 = time.perf_counter_ns()
        admit.append(t1 - t0)
        settle.append(t2 - t1)
    return {name: {"p50_us": round(statistics.median(v) / 1000, 2),
                   "p99_us": round(statistics.quantiles(v, n=100)[98] / 1000, 2)}
            for name, v in (("admit", admit), ("settle", settle))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    results = {}
    for writemap in (True, False):
        with tempfile.TemporaryDirectory() as work:
            governor = limits.Governor(Path(work), Costs({}))
            if not writemap:  # the same environment, reopened with plain writes
                governor.env.close()
                governor.env = limits.lmdb.open(work, map_size=limits.MAP_SIZE, sync=False, metasync=False)
            measure(governor, 1000)  # warm up
            results["writemap" if writemap else "pwrite"] = measure(governor, args.requests)
            governor.close()
    unlimited = Principal(key_id="k2", name="free", role="developer")
    with tempfile.TemporaryDirectory() as work:
        governor = limits.Governor(Path(work), Costs({}))
        t0 = time.perf_counter_ns()
        for _ in range(args.requests):
            governor.settle(governor.admit(unlimited, "m", worst_tokens=1000, worst_cost=0.0), tokens=1, cost=0.0)
        results["no_limits_admit_and_settle_us"] = round((time.perf_counter_ns() - t0) / args.requests / 1000, 3)
        governor.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
