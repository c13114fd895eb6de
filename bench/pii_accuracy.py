"""Precision and recall of each PII detector on the labelled corpus in tests/pii_corpus/.

Every line of tests/pii_corpus/*.jsonl is {"text": ..., "spans": [{"kind": ..., "value": ...}]}
listing all the personal data in the text (none for hard negatives). A detector's match
counts as right when the same kind and exact value is labelled in that line (span-level,
exact value); anything else it finds is a false positive, anything it misses a false
negative. Prints a markdown table (docs/pii.md quotes it); with --errors, each mistake; with
--speed, the median time of find_pii on a ~500-character Korean and English chat message.
Usage: .venv/bin/python bench/pii_accuracy.py [--errors] [--speed]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.pii import KINDS, find_pii  # noqa: E402

CORPUS = ROOT / "tests" / "pii_corpus"


def load_corpus(folder: Path = CORPUS) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score(rows: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """Per kind: labelled, found, true positives, precision and recall; and every mistake, described."""
    labelled, found, right = Counter(), Counter(), Counter()
    mistakes = []
    for row in rows:
        expected = Counter((span["kind"], span["value"]) for span in row["spans"])
        got = Counter((match.kind, match.value) for match in find_pii(row["text"]))
        hits = expected & got
        for (kind, _), n in expected.items():
            labelled[kind] += n
        for (kind, _), n in got.items():
            found[kind] += n
        for (kind, _), n in hits.items():
            right[kind] += n
        mistakes += [f"missed {kind} {value!r} in {row['text']!r}" for kind, value in expected - got]
        mistakes += [f"wrong {kind} {value!r} in {row['text']!r}" for kind, value in got - expected]
    table = {kind: {"labelled": labelled[kind], "found": found[kind], "right": right[kind],
                    "precision": right[kind] / found[kind] if found[kind] else 1.0,
                    "recall": right[kind] / labelled[kind] if labelled[kind] else 1.0}
             for kind in KINDS}
    return table, mistakes


def markdown(table: dict[str, dict], rows: int) -> str:
    lines = [f"Corpus: {rows} lines, {sum(r['labelled'] for r in table.values())} labelled values.", "",
             "| detector | labelled | found | correct | precision | recall |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {kind} | {r['labelled']} | {r['found']} | {r['right']} | {r['precision']:.3f} | {r['recall']:.3f} |"
              for kind, r in table.items()]
    return "\n".join(lines)


CHAT = ("안녕하세요, 지난주 회의에서 논의한 Q3 로드맵 관련해서 몇 가지 여쭤볼게요. The new onboarding flow should ship "
        "by 2024-11-15, but the design team needs 2 more weeks. 둘째로 서버 비용이 월 3,500,000원 정도 나오는데 이걸 "
        "20% 줄일 방법이 있을까요? We tried scaling down to 4 replicas and latency went up to 350ms at p99. 셋째, 고객 "
        "문의가 하루 평균 120건 들어오고 있어서 FAQ 문서를 업데이트해야 할 것 같아요. Could you summarise the trade-offs "
        "and suggest a plan for the v2.3 release? 감사합니다!")
MESSAGES = {
    "no personal data": CHAT,
    "no personal data, long digit runs (order 20241115-12345)": CHAT.replace("120건", "주문 20241115-12345건"),
    "a phone number, an RRN and an email": CHAT + " 제 번호는 010-1234-5678이고 주민번호는 900101-1234568, kim@example.com",
}


def speed(runs: int = 5000) -> str:
    lines = ["| message (~500 characters) | p50 µs | p99 µs |", "| --- | ---: | ---: |"]
    for name, text in MESSAGES.items():
        timings = []
        for _ in range(runs):
            began = time.perf_counter()
            find_pii(text)
            timings.append(time.perf_counter() - began)
        timings.sort()
        lines.append(f"| {name} | {timings[runs // 2] * 1e6:.0f} | {timings[runs * 99 // 100] * 1e6:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--errors", action="store_true", help="also list every false positive and false negative")
    parser.add_argument("--speed", action="store_true", help="also time find_pii on chat messages")
    args = parser.parse_args()
    rows = load_corpus()
    table, mistakes = score(rows)
    print(markdown(table, len(rows)))
    if args.errors:
        print("\n" + "\n".join(mistakes or ["no mistakes"]))
    if args.speed:
        print("\n" + speed())


if __name__ == "__main__":
    main()
