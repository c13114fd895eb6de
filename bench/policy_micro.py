"""What a key's policy (appliance/policies.py) costs per request on the gateway's hot path: the
steps of Gateway._apply_policy (the body decoded, `policies.inspect`, and when a value is masked the
body re-encoded and checked again) for an OpenAI chat body with a system prompt and one user
message: one with nothing to mask, one with a phone number (masked). Two policies: every PII
detector masked ({"*": "mask"}), and the same with the injection heuristics on and a short deny
list (literal entries; --deny-regex adds a regular expression entry, which costs a regex search of
every text). Prints the median and 99th percentile in microseconds. One process, after a warm-up.
Usage: .venv/bin/python bench/policy_micro.py [--requests 50000] [--deny-regex] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance import policies  # noqa: E402
from appliance.governance import Policy  # noqa: E402
from services.gateway import schemas  # noqa: E402

MASK = Policy(pii={"*": "mask"})
DENY = ["project falcon", "기밀 문서", "falcon-7"]
DENY_REGEX = "re:\\bcodename-[0-9]+\\b"
SYSTEM = "You are a helpful assistant. Answer briefly and politely."
MESSAGES = {
    "nothing_found": "What is the capital of France? Answer in one word.",
    "masked": "프랑스의 수도는 어디인가요? 010-1234-5678로 답해 주세요. In one word.",
}
ENDPOINT, SCHEMA = "chat/completions", schemas.ChatCompletionRequest


def body_of(message: str) -> bytes:
    return msgspec.json.encode({"model": "m", "messages": [{"role": "system", "content": SYSTEM},
                                                           {"role": "user", "content": message}]})


def apply_policy(policy: Policy, body: bytes, parsed) -> tuple[bytes, object]:
    """What Gateway._apply_policy does around the audit log and metrics."""
    inspection = policies.inspect(policy, ENDPOINT, msgspec.json.decode(body))
    if inspection.body is None:
        return body, parsed
    body = msgspec.json.encode(inspection.body)
    return body, schemas.decode(body, SCHEMA)


def measure(policy: Policy, body: bytes, requests: int) -> dict:
    parsed = schemas.decode(body, SCHEMA)
    times = []
    for _ in range(requests):
        t0 = time.perf_counter_ns()
        apply_policy(policy, body, parsed)
        times.append(time.perf_counter_ns() - t0)
    return {"p50_us": round(statistics.median(times) / 1000, 2),
            "p99_us": round(statistics.quantiles(times, n=100)[98] / 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--deny-regex", action="store_true", help=f"add {DENY_REGEX[3:]} to the deny list")
    parser.add_argument("--profile", action="store_true", help="also print where the time goes (cProfile)")
    args = parser.parse_args()
    deny = [*DENY, DENY_REGEX] if args.deny_regex else DENY
    full = Policy(pii={"*": "mask"}, injection="block", deny=deny)
    results = {}
    for label, policy in (("mask", MASK), ("mask+injection+deny", full)):
        for name, message in MESSAGES.items():
            body = body_of(message)
            masked, _ = apply_policy(policy, body, None)
            assert (masked != body) == (name == "masked"), masked  # the bench measures what it says
            measure(policy, body, 2000)  # warm up
            results[f"{label}, {name}"] = measure(policy, body, args.requests)
            if args.profile:
                parsed = schemas.decode(body, SCHEMA)
                profile = cProfile.Profile()
                profile.runcall(lambda: [apply_policy(policy, body, parsed) for _ in range(args.requests)])
                print(f"--- {label}, {name}", file=sys.stderr)
                pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
