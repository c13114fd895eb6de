"""The governor (appliance/limits.py) on real LMDB files: exact budgets under threads and
real processes, rate limits with OpenAI's headers, teams, periods, dead holders, restarts,
and a ledger rebuilt from the usage table."""

from __future__ import annotations

import calendar
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.costs import Costs
from appliance.db import open_db
from appliance.errors import QuotaExceeded, RateLimited
from appliance.governance import Limits, Principal
from appliance.limits import LEASE_MIN, LEASE_S, Clock, Counter, Governor, duration

ROOT = Path(__file__).resolve().parents[2]
NOON = float(calendar.timegm((2026, 3, 14, 12, 0, 0)))  # a Saturday noon, UTC; the minute starts on it


def key(name="k1", team=None, **limits) -> Principal:
    return Principal(key_id=name, name=name, role="developer", team_id=team, limits=Limits(**limits))


def team_key(name, team, team_limits: Limits, **limits) -> Principal:
    return Principal(key_id=name, name=name, role="developer", team_id=team, limits=Limits(**limits),
                     team_limits=team_limits)


@pytest.fixture
def governor(tmp_path):
    g = Governor(tmp_path / "ledger", Costs({}))
    yield g
    g.close()


def test_a_hundred_threads_never_overspend_a_budget(governor):
    budget, worst = 1000, 30  # room for 33 of the 100
    principal = key(budget_tokens=budget, period="day")
    start = threading.Barrier(100)

    def one(i):
        start.wait()
        try:
            ticket = governor.admit(principal, "m", worst_tokens=worst, worst_cost=0.0)
        except QuotaExceeded:
            return 0
        time.sleep(0.01)  # others ask while this one is in flight
        used = worst if i % 2 else worst - 5  # some use less than their worst case
        governor.settle(ticket, tokens=used, cost=0.0)
        return used

    with ThreadPoolExecutor(100) as pool:
        spent = sum(pool.map(one, range(100)))
    counter = governor.usage("k:k1")
    assert counter.day_tokens == spent <= budget
    assert counter.in_flight == 0 and counter.reserved_tokens == 0
    # used up to within one request: what is left is less than one more request's worst case...
    assert budget - spent < worst + 5 * 33, spent
    # ...and once the leftovers are taken, no request fits any more
    while True:
        try:
            governor.settle(governor.admit(principal, "m", worst_tokens=worst, worst_cost=0.0), tokens=worst, cost=0.0)
        except QuotaExceeded:
            break
    assert budget - worst < governor.usage("k:k1").day_tokens <= budget


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from appliance.costs import Costs
    from appliance.errors import QuotaExceeded
    from appliance.governance import Limits, Principal
    from appliance.limits import Governor

    ledger, go, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    governor = Governor(ledger, Costs({}))
    principal = Principal(key_id="shared", name="shared", role="developer",
                          limits=Limits(budget_cost=1.0, period="month"))
    while not go.exists():
        time.sleep(0.001)
    spent = 0.0
    for _ in range(count):
        deadline = time.monotonic() + 10
        while True:  # as the gateway does: wait for room held by others' requests and leases
            try:
                ticket = governor.admit(principal, "m", worst_tokens=10, worst_cost=0.03)
                break
            except QuotaExceeded as exc:
                if not exc.held or time.monotonic() > deadline:
                    ticket = None
                    break
            time.sleep(0.005)
            governor.return_leases()
        if ticket is None:
            continue
        governor.settle(ticket, tokens=10, cost=0.03)
        spent += 0.03
    print(json.dumps(spent))
    governor.close()
""")


def test_several_processes_share_one_budget_exactly(tmp_path):
    """Four real processes, 25 requests each, against a cost budget with room for 33 of them (leased
    at first: an eighth of it is room for 4)."""
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(ledger), str(go), "25"], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(1.0)  # all started and waiting
    go.touch()
    spent = sum(json.loads(w.communicate(timeout=60)[0]) for w in workers)
    assert all(w.returncode == 0 for w in workers)
    assert 1.0 - 0.03 < spent <= 1.0 + 1e-9
    governor = Governor(ledger, Costs({}))
    try:
        assert governor.usage("k:shared").month_cost == pytest.approx(spent)
    finally:
        governor.close()


def test_requests_per_minute_with_openai_headers(governor):
    principal = key(rpm=3)
    remaining = []
    for second in (0, 1, 2):
        ticket = governor.admit(principal, "m", worst_tokens=1, worst_cost=0, now=NOON + second)
        headers = dict(ticket.headers)
        remaining.append(headers["x-ratelimit-remaining-requests"])
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-reset-requests"] == (f"1m{60 - second}s" if second else "2m0s")
        assert "x-ratelimit-limit-tokens" not in headers  # no tpm: no tokens trio
        governor.settle(ticket, tokens=1, cost=0, now=NOON + second)
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as refused:
        governor.admit(principal, "m", worst_tokens=1, worst_cost=0, now=NOON + 30)
    error = refused.value
    assert error.status == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert "key 'k1'" in error.message and "3 requests per minute (rpm)" in error.message
    headers = error.headers()
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    # the three of this minute fade out over the next: one fits once a third of it has passed
    assert headers["Retry-After"] == str(30 + 20)
    with pytest.raises(RateLimited):
        governor.admit(principal, "m", worst_tokens=1, worst_cost=0, now=NOON + 60 + 19)
    governor.admit(principal, "m", worst_tokens=1, worst_cost=0, now=NOON + 60 + 21)


def test_tokens_per_minute_count_the_worst_case_until_settled(governor):
    principal = key(tpm=100)
    first = governor.admit(principal, "m", worst_tokens=40, worst_cost=0, now=NOON)
    second = governor.admit(principal, "m", worst_tokens=40, worst_cost=0, now=NOON + 1)
    assert dict(second.headers)["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(RateLimited) as refused:
        governor.admit(principal, "m", worst_tokens=40, worst_cost=0, now=NOON + 2)
    assert refused.value.type == "tokens" and "100 tokens per minute (tpm)" in refused.value.message
    assert refused.value.headers()["x-ratelimit-remaining-tokens"] == "20"
    governor.settle(first, tokens=5, cost=0, now=NOON + 3)  # it used far less than its worst case
    governor.admit(principal, "m", worst_tokens=40, worst_cost=0, now=NOON + 4)
    with pytest.raises(RateLimited) as too_big:
        governor.admit(principal, "m", worst_tokens=101, worst_cost=0, now=NOON + 5)
    assert "more than the limit itself" in too_big.value.message


def test_parallel_requests(governor):
    principal = key(max_parallel=2)
    tickets = [governor.admit(principal, "m", worst_tokens=1, worst_cost=0) for _ in range(2)]
    with pytest.raises(RateLimited) as refused:
        governor.admit(principal, "m", worst_tokens=1, worst_cost=0)
    assert "2 at once (max_parallel)" in refused.value.message and refused.value.headers()["Retry-After"] == "1"
    governor.settle(tickets[0], tokens=0, cost=0)
    governor.settle(tickets[0], tokens=0, cost=0)  # settling twice frees one slot, once
    governor.admit(principal, "m", worst_tokens=1, worst_cost=0)
    with pytest.raises(RateLimited):
        governor.admit(principal, "m", worst_tokens=1, worst_cost=0)


def test_a_team_budget_is_shared_by_its_keys_and_a_refusal_reserves_nothing(governor):
    team = Limits(budget_tokens=100, period="day")
    alice, bob = team_key("alice", "t1", team, rpm=100), team_key("bob", "t1", team)
    governor.settle(governor.admit(alice, "m", worst_tokens=60, worst_cost=0, now=NOON), tokens=60, cost=0, now=NOON)
    with pytest.raises(QuotaExceeded) as refused:
        governor.admit(bob, "m", worst_tokens=60, worst_cost=0, now=NOON)
    error = refused.value
    assert error.code == "insufficient_quota" and "team 't1'" in error.message and "40 tokens left" in error.message
    assert error.headers()["Retry-After"] == str(12 * 3600)  # until midnight UTC
    before = governor.usage("k:alice", now=NOON)
    with pytest.raises(QuotaExceeded):
        governor.admit(alice, "m", worst_tokens=60, worst_cost=0, now=NOON)
    after = governor.usage("k:alice", now=NOON)
    assert (after.requests, after.in_flight, after.reserved_tokens) == (before.requests, 0, 0)
    governor.admit(bob, "m", worst_tokens=40, worst_cost=0, now=NOON)


def test_the_tighter_of_key_and_team_wins(governor):
    principal = team_key("k1", "t1", Limits(rpm=2), rpm=5)
    first = governor.admit(principal, "m", worst_tokens=1, worst_cost=0, now=NOON)
    assert dict(first.headers)["x-ratelimit-remaining-requests"] == "1"  # the team's, not the key's 4
    governor.admit(principal, "m", worst_tokens=1, worst_cost=0, now=NOON)
    with pytest.raises(RateLimited) as refused:
        governor.admit(principal, "m", worst_tokens=1, worst_cost=0, now=NOON)
    assert "team 't1'" in refused.value.message
    loose_team = team_key("k2", "t2", Limits(budget_cost=100.0), budget_cost=0.5)
    with pytest.raises(QuotaExceeded) as refused:
        governor.admit(loose_team, "m", worst_tokens=1, worst_cost=0.6, now=NOON)
    assert "key 'k2'" in refused.value.message and "budget_cost" in refused.value.message


def test_budgets_start_again_with_their_period(governor):
    daily, monthly = key("d", budget_tokens=10, period="day"), key("m", budget_tokens=10, period="month")
    for principal in (daily, monthly):
        governor.settle(governor.admit(principal, "x", worst_tokens=10, worst_cost=0, now=NOON), tokens=10, cost=0,
                        now=NOON)
    tomorrow = NOON + 86400
    governor.admit(daily, "x", worst_tokens=10, worst_cost=0, now=tomorrow)
    with pytest.raises(QuotaExceeded) as refused:
        governor.admit(monthly, "x", worst_tokens=10, worst_cost=0, now=tomorrow)
    april = calendar.timegm((2026, 4, 1, 0, 0, 0))
    assert refused.value.headers()["Retry-After"] == str(int(april - tomorrow))
    governor.admit(monthly, "x", worst_tokens=10, worst_cost=0, now=april)


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from appliance.costs import Costs
    from appliance.governance import Limits, Principal
    from appliance.limits import Governor

    governor = Governor(Path(sys.argv[1]), Costs({}))
    principal = Principal(key_id="k1", name="k1", role="developer", limits=Limits(max_parallel=3, budget_tokens=1000))
    for _ in range(3):
        governor.admit(principal, "m", worst_tokens=100, worst_cost=0)
    print("admitted", flush=True)
    time.sleep(600)
""")


def test_a_killed_holders_reservations_are_swept(governor, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(governor.ledger_dir)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "admitted"
        assert governor.sweep() == 0  # alive: its holds stay
        counter = governor.usage("k:k1")
        assert (counter.in_flight, counter.reserved_tokens) == (3, 300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert governor.sweep() == 3
    counter = governor.usage("k:k1")
    assert (counter.in_flight, counter.reserved_tokens, counter.month_tokens) == (0, 0, 0)
    assert governor.sweep() == 0
    assert [p.name for p in (governor.ledger_dir / "holders").iterdir()] == [governor.holder + ".lock"]


def test_counters_survive_a_restart(tmp_path):
    principal = key(budget_tokens=100, rpm=10)
    first = Governor(tmp_path / "ledger", Costs({}))
    first.settle(first.admit(principal, "m", worst_tokens=80, worst_cost=0, now=NOON), tokens=70, cost=0, now=NOON)
    first.admit(principal, "m", worst_tokens=20, worst_cost=0, now=NOON)
    first.close()  # a restart: the ticket in flight is never settled by this process
    second = Governor(tmp_path / "ledger", Costs({}))
    try:
        counter = second.usage("k:k1", now=NOON + 1)
        assert (counter.month_tokens, counter.requests, counter.reserved_tokens) == (70, 2, 20)
        assert second.sweep(now=NOON + 1) == 1  # the closed holder's reservation is released
        with pytest.raises(QuotaExceeded):
            second.admit(principal, "m", worst_tokens=31, worst_cost=0, now=NOON + 2)
        second.admit(principal, "m", worst_tokens=30, worst_cost=0, now=NOON + 2)
    finally:
        second.close()


def test_a_new_ledger_is_seeded_from_the_usage_table(tmp_path):
    db = open_db(tmp_path / "state.db")
    rows = [  # ts, request id, key, user, team, tokens, cost
        (NOON - 3600, "r1", "k1", "u1", "t1", 100, 0.5),  # this morning
        (NOON - 5 * 86400, "r2", "k1", "u1", "t1", 50, 0.25),  # earlier this month
        (NOON - 30 * 86400, "r3", "k1", "u1", "t1", 1000, 9.0),  # last month: not counted
        (NOON - 60, "r4", None, "u2", "t1", 7, 0.125),  # a JWT caller of the same team
    ]
    for ts, request_id, key_id, user_id, team_id, tokens, cost in rows:
        db.execute("INSERT INTO usage (ts, request_id, key_id, user_id, team_id, model, endpoint, stream, status, "
                   "total_tokens, cost) VALUES (?, ?, ?, ?, ?, 'm', 'chat/completions', 0, 200, ?, ?)",
                   [ts, request_id, key_id, user_id, team_id, tokens, cost])
    governor = Governor(tmp_path / "ledger", Costs({}))
    try:
        assert governor.seed_from_usage(db, now=NOON) is True
        k1, t1 = (governor.usage(s, now=NOON) for s in ("k:k1", "t:t1"))
        assert (k1.day_tokens, k1.month_tokens, k1.day_cost, k1.month_cost) == (100, 150, 0.5, 0.75)
        assert (t1.day_tokens, t1.month_tokens, t1.month_cost) == (107, 157, 0.875)
        assert governor.seed_from_usage(db, now=NOON) is False  # once: the ledger is no longer new
        with pytest.raises(QuotaExceeded):
            governor.admit(key("k1", budget_tokens=200), "m", worst_tokens=51, worst_cost=0, now=NOON)
    finally:
        governor.close()
        db.conn.close()


def write_transactions(governor: Governor) -> int:
    return governor.env.info()["last_txnid"]


def test_far_from_its_limits_a_key_is_admitted_from_a_lease_and_counted_exactly(governor):
    principal = team_key("k1", "t1", Limits(budget_tokens=10**9), rpm=10**6, tpm=10**9, max_parallel=10**4,
                         budget_tokens=10**9, budget_cost=10**6)
    before = write_transactions(governor)
    remaining, used = [], 0
    for i in range(400):
        ticket = governor.admit(principal, "m", worst_tokens=100, worst_cost=0.01, now=NOON + i / 1000)
        remaining.append(int(dict(ticket.headers)["x-ratelimit-remaining-requests"]))
        governor.settle(ticket, tokens=i % 50, cost=0.001, now=NOON + i / 1000)
        used += i % 50
    assert write_transactions(governor) - before < 20  # not two per request: most came from leases
    assert remaining == sorted(remaining, reverse=True) and remaining[0] - remaining[-1] == 399
    for subject in ("k:k1", "t:t1"):
        counter = governor.usage(subject, now=NOON + 1)  # this process's leases given back first
        assert (counter.requests, counter.tokens, counter.day_tokens) == (400, used, used)
        assert counter.day_cost == pytest.approx(0.4)
        assert (counter.in_flight, counter.reserved_tokens, counter.reserved_cost, counter.leases) == (0, 0, 0, 0)


def test_answers_from_a_lease_carry_the_sliding_windows_headers(governor):
    """lease_headers: the tighter subject for each trio, the exact reset, and what is left with the previous
    minute weighed at the start of the second (never more than the exact count, at most prev/60 under it)."""
    worst, prev = 100, 600
    principal = team_key("k1", "t1", Limits(rpm=500_000, tpm=10**9), rpm=10**6, tpm=3 * 10**8)
    for i in range(prev):
        ticket = governor.admit(principal, "m", worst_tokens=worst, worst_cost=0, now=NOON - 60 + i / 100)
        governor.settle(ticket, tokens=0, cost=0, now=NOON - 60 + i / 100)
    before, current = write_transactions(governor), 0
    for second in (0.25, 7.5, 12.9, 13.2, 29.9, 59.99):  # 12.9 and 13.2: one lease, two seconds
        for i in range(50):
            now = NOON + second + i / 10**5
            ticket = governor.admit(principal, "m", worst_tokens=worst, worst_cost=0, now=now)
            current += 1
            into = (now % 60) / 60
            exact = 500_000 - (prev * (1 - into) + current)
            headers = dict(ticket.headers)
            assert headers["x-ratelimit-limit-requests"] == "500000"  # the team's: less left
            assert exact - prev / 60 - 1 <= int(headers["x-ratelimit-remaining-requests"]) <= exact
            assert headers["x-ratelimit-reset-requests"] == duration((2 - into) * 60)
            assert headers["x-ratelimit-limit-tokens"] == "300000000"  # the key's
            assert headers["x-ratelimit-remaining-tokens"] == str(3 * 10**8 - worst)  # settled ones used none
            assert headers["x-ratelimit-reset-tokens"] == headers["x-ratelimit-reset-requests"]
            governor.settle(ticket, tokens=0, cost=0, now=now)
    assert write_transactions(governor) - before < 20  # they came from leases


def test_near_a_limit_there_is_no_lease(governor):
    principal = key(budget_tokens=1000)  # an eighth of it is room for one request of 100: under LEASE_MIN
    governor.admit(principal, "m", worst_tokens=100, worst_cost=0, now=NOON)
    counter = governor.usage("k:k1", now=NOON)
    assert (counter.leases, counter.in_flight, counter.reserved_tokens) == (0, 1, 100)


def test_a_lease_gives_back_what_it_did_not_hand_out_when_it_expires(governor):
    principal = key(rpm=10**5, max_parallel=10**4)
    held = governor.admit(principal, "m", worst_tokens=10, worst_cost=0, now=NOON)
    leased = governor._open["k:k1"]  # the lease that admitted it
    assert leased.record.requests > 1
    governor.return_leases(now=NOON + 0.1)  # not expired yet: kept
    assert "k:k1" in governor._open
    governor.return_leases(now=NOON + LEASE_S)
    assert "k:k1" not in governor._open and governor._closed == [leased]  # its request is still in flight
    counter = governor.usage("k:k1", now=NOON + LEASE_S)
    assert (counter.requests, counter.in_flight, counter.reserved_tokens, counter.leases) == (1, 1, 10, 0)
    governor.settle(held, tokens=3, cost=0, now=NOON + 1)
    counter = governor.usage("k:k1", now=NOON + 1)
    assert (counter.requests, counter.tokens, counter.month_tokens, counter.in_flight, counter.reserved_tokens) == (
        1, 3, 3, 0, 0)
    assert governor._closed == []


def in_ledger(governor: Governor, subject: str, now: float) -> Counter:
    """What another worker reads: the ledger as it is, this process's leases not given back."""
    with governor.env.begin() as txn:
        return governor._counter(txn, b"s:" + subject.encode(), Clock(now))


def test_what_leased_requests_used_is_spent_at_each_give_back_while_others_are_in_flight(governor):
    """The spending the admin API shows lags a worker only until its next give-back, even while a
    long request of the same lease is still in flight."""
    principal = key(budget_tokens=10**6, budget_cost=10**3)
    first, second, third = (governor.admit(principal, "m", worst_tokens=100, worst_cost=0.5, now=NOON + i / 100)
                            for i in range(3))
    assert first.leases == second.leases == third.leases and first.leases  # one lease
    leased = first.leases[0].record.tokens
    governor.settle(first, tokens=30, cost=0.25, now=NOON + 0.1)
    counter = in_ledger(governor, "k:k1", NOON + 0.1)  # the lease is open: its use is still reserved
    assert (counter.month_tokens, counter.reserved_tokens, counter.leases) == (0, leased, 1)
    governor.return_leases(now=NOON + LEASE_S)  # expired: closed, two requests in flight
    counter = in_ledger(governor, "k:k1", NOON + LEASE_S)
    assert (counter.month_tokens, counter.month_cost, counter.in_flight, counter.reserved_tokens, counter.leases) == (
        30, 0.25, 2, 200, 0)
    assert counter.reserved_cost == pytest.approx(1.0)
    governor.settle(second, tokens=40, cost=0.125, now=NOON + 1)
    governor.return_leases(now=NOON + 1)  # what `second` used, spent; `third` still holds its worst case
    counter = in_ledger(governor, "k:k1", NOON + 1)
    assert (counter.month_tokens, counter.month_cost, counter.in_flight, counter.reserved_tokens) == (
        70, 0.375, 1, 100)
    assert counter.reserved_cost == pytest.approx(0.5) and counter.tokens == 170  # the window: 30 + 40 + 100
    governor.settle(third, tokens=50, cost=0.0625, now=NOON + 2)
    governor.return_leases(now=NOON + 2)
    counter = in_ledger(governor, "k:k1", NOON + 2)
    assert (counter.month_tokens, counter.month_cost, counter.in_flight, counter.reserved_tokens) == (
        120, 0.4375, 0, 0)
    assert counter.reserved_cost == 0 and counter.requests == 3 and counter.tokens == 120
    assert governor._closed == []
    before = write_transactions(governor)
    governor.return_leases(now=NOON + 3)  # nothing left to give back: no write
    assert write_transactions(governor) == before


LEASER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from appliance.costs import Costs
    from appliance.governance import Limits, Principal
    from appliance.limits import Governor

    governor = Governor(Path(sys.argv[1]), Costs({}))
    principal = Principal(key_id="k1", name="k1", role="developer", limits=Limits(budget_tokens=10**6))
    governor.settle(governor.admit(principal, "m", worst_tokens=100, worst_cost=0), tokens=40, cost=0)
    print("leased", flush=True)
    time.sleep(600)
""")


def test_a_killed_holders_leases_count_as_spent_in_full(governor):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", LEASER, str(governor.ledger_dir)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "leased"
        counter = governor.usage("k:k1")
        assert counter.leases == 1 and counter.month_tokens == 0
        leased = counter.reserved_tokens
        assert leased >= LEASE_MIN * 100
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert governor.sweep() == 1
    counter = governor.usage("k:k1")
    # what it handed out died with it: the whole lease is spent, so the budget is never overspent
    assert (counter.leases, counter.in_flight, counter.reserved_tokens, counter.month_tokens) == (0, 0, 0, leased)


def test_a_refusal_behind_another_workers_lease_says_it_is_held(tmp_path):
    ledger = tmp_path / "ledger"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", LEASER.replace("budget_tokens=10**6", "max_parallel=64"),
                               str(ledger)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "leased"
        governor = Governor(ledger, Costs({}))
        try:
            leased = governor.usage("k:k1").in_flight
            assert leased >= LEASE_MIN
            principal = key(max_parallel=64)
            tickets = [governor.admit(principal, "m", worst_tokens=1, worst_cost=0) for _ in range(64 - leased)]
            with pytest.raises(RateLimited) as refused:
                governor.admit(principal, "m", worst_tokens=1, worst_cost=0)
            assert refused.value.held  # the gateway waits for the other worker to give its lease back
            for ticket in tickets:
                governor.settle(ticket, tokens=0, cost=0)
        finally:
            governor.close()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
