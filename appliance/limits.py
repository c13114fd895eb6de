"""The governor: rate limits, parallel requests and budgets of keys, users and teams, exact
under any concurrency and shared by every gateway worker process.

State lives in an LMDB environment (the ledger, a directory under the home). Admission
(check every limit, then reserve the worst case) and settlement (replace the reservation
by the real usage) are each one LMDB write transaction, so no two requests, in one process
or several, ever both take the last of a budget. LMDB's write lock is a robust mutex in
shared memory; opened without sync (sync and metasync off), a commit writes to mapped
memory only, a few microseconds (bench/limits_micro.py), which the event loop can afford.
A process that crashes loses nothing (the pages are the kernel's); a power cut may lose
the last moments of counting.

What is counted, per subject (a key; a team, shared by its keys, sessions and identity-
provider callers), and only for subjects with limits:
- in flight now (max_parallel);
- requests and tokens per minute (rpm, tpm) as a sliding-window counter: this minute's
  count plus the previous minute's, weighted by the share of the previous minute still
  inside the last 60 s; a request's tokens count at admission as its worst case, replaced
  by its real tokens at settlement;
- tokens and cost spent per calendar day and per calendar month (UTC), plus what is
  reserved by requests in flight; a request is admitted only if spent + reserved + its
  worst case stays within each budget.

A budget set in the middle of a period counts from when the ledger first saw a limit on
that subject (or from the usage table, for a new ledger: `seed_from_usage`).

Leases keep the ledger off most requests. Where every limit of a request's subjects has
plenty of room left, admission takes a lease instead of one reservation: room for n
requests like this one (n slots, n requests, n times its worst tokens and cost), counted
in the ledger at once like n reservations, never more than 1/LEASE_SHARE of what any
limit has left. The next requests of this process are admitted from the lease in memory,
and settle into it (a request's unused worst case goes back to the lease); a lease admits
for LEASE_S at most, and within its minute. When a request does not fit its lease (or
the lease expired), the next ledger transaction gives back what the lease did not hand
out and counts what its settled requests used as spent; a request still in flight then is
counted at the next give-back after it settles (the gateway's housekeeping gives back
every second), so the spending others read lags a worker by at most LEASE_S and a tick
(`usages`). n adapts to the traffic (about LEASE_S worth of it). Near a limit no lease
is granted and every request is counted in the ledger on its own, so the limits stay
exact: a refusal is only ever decided in the ledger, after this process gave back its own
leases, and a refusal that only another worker's lease stands behind says so (`held`: the
gateway waits for it, at most LEASE_S plus a housekeeping tick).

Reservations and leases are recorded per holder: each Governor holds an flock'ed file
named by a random token for its life. `sweep()` releases the reservations of holders
whose file is gone or can be locked (their process died), as unused, and their leases as
spent in full (what a lease handed out is known only to its process): a crash never lets
a budget be overspent.
"""

from __future__ import annotations

import calendar
import fcntl
import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgspec
import sqlite_utils

from appliance.costs import WINDOW_S, Costs, WindowState
from appliance.errors import QuotaExceeded, RateLimited
from appliance.governance import Limits, Principal

MAP_SIZE = 1 << 30  # address space reserved for the ledger; the file grows only as used
HOLDERS = "holders"
LOCK_SUFFIX = ".lock"
_SUBJECT = b"s:"
_RESERVATION = b"r:"
_LEASE = b"l:"
_THROUGHPUT = b"tp:"
_SEEDED = b"meta:seeded"
KEY_SUBJECT, TEAM_SUBJECT = "k:", "t:"  # a key's counter in the ledger is k:<key id>; a team's, t:<team id>
SUBJECTS_CACHED = 10_000  # principals whose subjects are remembered
LEASE_S = 0.5  # a lease admits for at most this long
LEASE_SHARE = 8  # a lease takes at most 1/8 of what any limit has left...
LEASE_MIN, LEASE_START, LEASE_MAX = 4, 16, 4096  # ...and room for this many requests like the one asking


class Counter(msgspec.Struct, array_like=True):
    """What one subject has used."""

    in_flight: int = 0
    minute: int = 0  # now // 60 when last counted
    requests: int = 0  # in that minute
    prev_requests: int = 0  # in the minute before
    tokens: int = 0
    prev_tokens: int = 0
    day: int = 0  # days since the epoch (UTC)
    day_tokens: int = 0
    day_cost: float = 0.0
    month: int = 0  # year * 12 + month - 1 (UTC)
    month_tokens: int = 0
    month_cost: float = 0.0
    reserved_tokens: int = 0  # worst cases of requests in flight, and leases
    reserved_cost: float = 0.0
    leases: int = 0  # open leases, of every holder

    def roll(self, clock: Clock) -> None:
        # Forward only: a clock a little behind (another worker's `now`) counts in the newer minute.
        if clock.minute > self.minute:
            last = self.minute == clock.minute - 1
            self.prev_requests, self.prev_tokens = (self.requests, self.tokens) if last else (0, 0)
            self.requests = self.tokens = 0
            self.minute = clock.minute
        if clock.day > self.day:
            self.day, self.day_tokens, self.day_cost = clock.day, 0, 0.0
        if clock.month > self.month:
            self.month, self.month_tokens, self.month_cost = clock.month, 0, 0.0

    def spent(self, period: str) -> tuple[int, float]:
        return (self.day_tokens, self.day_cost) if period == "day" else (self.month_tokens, self.month_cost)


class Reservation(msgspec.Struct, array_like=True):
    subjects: list[str]
    tokens: int
    cost: float
    minute: int


class LeaseRecord(msgspec.Struct, array_like=True):
    """What the ledger counts for one lease: slots, requests (in `minute`), tokens and cost taken
    from one subject; `open` while it may still hand them out."""

    subject: str
    slots: int
    requests: int
    tokens: int
    cost: float
    minute: int
    open: bool = True


class Clock:
    """Where `now` falls: its minute, day and month (UTC), and how far into the minute."""

    __slots__ = ("now", "minute", "day", "month", "into_minute")

    def __init__(self, now: float):
        self.now = now
        self.minute = int(now // 60)
        self.day = int(now // 86400)
        self.month = _month_of(self.day)
        self.into_minute = (now % 60) / 60  # 0..1

    def period_start(self, period: str, later: int = 0) -> float:
        """When this day or month (or the `later`-th one after it) starts."""
        if period == "day":
            return (self.day + later) * 86400.0
        year, month = divmod(self.month + later, 12)
        return float(calendar.timegm((year, month + 1, 1, 0, 0, 0)))

    def period_end(self, period: str) -> float:
        return self.period_start(period, later=1)


@dataclass(slots=True)
class Subject:
    id: str  # k:<key id> or t:<team id>
    label: str  # for messages: key 'name', team '<id>'
    limits: Limits
    key: bytes = b""  # where its Counter is in the ledger

    def __post_init__(self) -> None:
        self.key = _SUBJECT + self.id.encode()


@dataclass(slots=True, eq=False)
class Lease:
    """Room this process took from one subject's limits (see the module's doc). The free room is
    what it may still hand out; its record always equals free + used + what requests in flight hold."""

    key: bytes  # its LeaseRecord in the ledger
    subject: Subject
    record: LeaseRecord
    base: Counter  # the subject's counter when granted, without this lease: for x-ratelimit-*
    granted: float
    expires: float
    slots: int  # free room
    requests: int
    tokens: int
    cost: float
    used_tokens: int = 0  # settled, not yet counted as spent in the ledger
    used_cost: float = 0.0
    in_flight: int = 0
    second: int = -1  # the whole second the four below were worked out for (lease_headers)
    room_requests: int = 0  # what rpm and tpm had left then, less all the lease holds
    room_tokens: int = 0
    shown_requests: tuple | None = None  # the limit and reset headers of each trio, that second
    shown_tokens: tuple | None = None

    def take(self, tokens: int, cost: float) -> None:
        self.slots -= 1
        self.requests -= 1
        self.tokens -= tokens
        self.cost -= cost
        self.in_flight += 1



class Ticket(msgspec.Struct):
    """One admitted request: what it reserved (in the ledger, or from leases), and the
    x-ratelimit-* headers for its answer. (A Struct: made on every request, in a third of a dataclass's time.)"""

    id: bytes  # its Reservation in the ledger; empty when it came from leases
    headers: list[tuple[str, str]] = []
    settled: bool = False
    leases: list[Lease] | None = None
    worst_tokens: int = 0
    worst_cost: float = 0.0


UNLIMITED = Ticket(b"", settled=True)  # a request nobody limits: nothing to settle


@functools.lru_cache(maxsize=64)
def _month_of(day: int) -> int:
    t = time.gmtime(day * 86400)
    return t.tm_year * 12 + t.tm_mon - 1


def _encode(value) -> bytes:
    return msgspec.msgpack.encode(value)


_decode_counter = msgspec.msgpack.Decoder(Counter).decode
_decode_reservation = msgspec.msgpack.Decoder(Reservation).decode
_decode_window = msgspec.msgpack.Decoder(WindowState).decode
_decode_lease = msgspec.msgpack.Decoder(LeaseRecord).decode


def subjects_of(principal: Principal) -> list[Subject]:
    """The key and the team, each with limits of its own to count (an identity provider's
    caller has no key: only its team's limits apply)."""
    subjects = []
    if principal.key_id is not None and counts(principal.limits):
        subjects.append(Subject(KEY_SUBJECT + principal.key_id, f"key '{principal.name}'", principal.limits))
    if principal.team_id is not None and counts(principal.team_limits):
        subjects.append(Subject(TEAM_SUBJECT + principal.team_id, f"team '{principal.team_name or principal.team_id}'",
                                principal.team_limits))
    return subjects


def counts(limits: Limits) -> bool:
    return any(v is not None for v in (limits.rpm, limits.tpm, limits.max_parallel, limits.budget_tokens,
                                       limits.budget_cost))


def windowed(prev: int, current: int, into: float) -> float:
    """The sliding-window count over the last 60 s, `into` (0..1) the minute."""
    return prev * (1 - into) + current


def wait_until_fits(prev: int, current: int, need: int, limit: int, into: float) -> float:
    """Seconds until windowed(prev, current) + need <= limit, counting nothing new meanwhile."""
    room = limit - need
    if room < 0:
        return float(WINDOW_S)  # more than a whole window allows: no sooner than a minute
    if current <= room:  # within this minute, as the previous minute's weight fades
        wait = 0.0 if prev == 0 else max(0.0, (1 - (room - current) / prev) - into) * 60
    else:  # next minute: this minute's count becomes the previous one and fades in turn
        wait = (1 - into) * 60 + max(0.0, 1 - room / current) * 60
    return round(wait, 3)  # to the millisecond: no float dust rounds a whole second up


def until_empty(prev: int, current: int, into: float) -> float:
    """Seconds until the window counts nothing (OpenAI's x-ratelimit-reset-*)."""
    if current:
        return (2 - into) * 60
    return (1 - into) * 60 if prev else 0.0


def duration(seconds: float) -> str:
    """OpenAI's form, to the millisecond: 20ms, 1s (whole seconds rounded up), 6m0s."""
    millis = round(seconds * 1000)  # round() to a whole number, not round(x, 3): that one formats a string
    if millis < 1000:
        return f"{millis}ms"
    return _whole_seconds(-(-millis // 1000))


@functools.lru_cache(maxsize=4096)
def _whole_seconds(whole: int) -> str:
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


_HEADER_NAMES = {kind: tuple(f"x-ratelimit-{part}-{kind}" for part in ("limit", "remaining", "reset"))
                 for kind in ("requests", "tokens")}
_REQUEST_HEADERS, _TOKEN_HEADERS = _HEADER_NAMES["requests"], _HEADER_NAMES["tokens"]


def _rate(kind: str, limit: int, prev: int, current: int, into: float) -> list[tuple[str, str]]:
    """OpenAI's three headers for what is left of a per-minute limit."""
    limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
    return [(limit_name, str(limit)), (remaining_name, str(max(0, math.floor(limit - windowed(prev, current, into))))),
            (reset_name, duration(until_empty(prev, current, into)))]


def rate_headers(subjects: list[Subject], windows: list[tuple[int, int, int, int]], into: float) -> list[tuple[str, str]]:
    """x-ratelimit-* for requests and for tokens, each from the subject with the least left; a window
    is (previous minute's requests, this minute's, previous minute's tokens, this minute's)."""
    requests = tokens = None
    for subject, (prev_requests, current_requests, prev_tokens, current_tokens) in zip(subjects, windows):
        limits = subject.limits
        if limits.rpm is not None:
            left = limits.rpm - windowed(prev_requests, current_requests, into)
            if requests is None or left < requests[0]:
                requests = (left, limits.rpm, prev_requests, current_requests)
        if limits.tpm is not None:
            left = limits.tpm - windowed(prev_tokens, current_tokens, into)
            if tokens is None or left < tokens[0]:
                tokens = (left, limits.tpm, prev_tokens, current_tokens)
    headers = _rate("requests", *requests[1:], into) if requests else []
    return headers + _rate("tokens", *tokens[1:], into) if tokens else headers


def lease_headers(leases: list[Lease], now: float) -> list[tuple[str, str]]:
    """rate_headers for a request admitted from leases (far from every limit), on the hot path: once
    a second each lease works out what its subject had left then (the previous minute weighed at the
    second's start: at most prev/60 under the exact count), less everything the lease holds; what the
    lease has not handed out is added back per request."""
    second = int(now)
    requests = tokens = None
    for lease in leases:
        if lease.second != second:
            _work_out_room(lease, second)
        if lease.shown_requests is not None:
            left = lease.room_requests + lease.requests
            if requests is None or left < requests[0]:
                requests = (left, lease.shown_requests)
        if lease.shown_tokens is not None:
            left = lease.room_tokens + lease.tokens
            if tokens is None or left < tokens[0]:
                tokens = (left, lease.shown_tokens if lease.base.tokens + lease.record.tokens > lease.tokens
                          else (lease.shown_tokens[0], (_TOKEN_HEADERS[2], _reset_of(lease, now))))
    headers = []
    if requests is not None:  # this request counts: the window holds something this minute
        left, (limit, reset) = requests
        headers += (limit, (_REQUEST_HEADERS[1], str(left) if left > 0 else "0"), reset)
    if tokens is not None:
        left, (limit, reset) = tokens
        headers += (limit, (_TOKEN_HEADERS[1], str(left) if left > 0 else "0"), reset)
    return headers


def _work_out_room(lease: Lease, second: int) -> None:
    base, record, limits = lease.base, lease.record, lease.subject.limits
    keep = 1 - (second % 60) / 60
    reset = _whole_seconds(120 - second % 60)  # until_empty with this minute counting, rounded up
    lease.second = second
    if limits.rpm is not None:
        lease.room_requests = math.floor(limits.rpm - base.prev_requests * keep) - base.requests - record.requests
        lease.shown_requests = ((_REQUEST_HEADERS[0], str(limits.rpm)), (_REQUEST_HEADERS[2], reset))
    if limits.tpm is not None:
        lease.room_tokens = math.floor(limits.tpm - base.prev_tokens * keep) - base.tokens - record.tokens
        lease.shown_tokens = ((_TOKEN_HEADERS[0], str(limits.tpm)), (_TOKEN_HEADERS[2], reset))


def _reset_of(lease: Lease, now: float) -> str:
    """x-ratelimit-reset-tokens for a window with nothing this minute (requests that cost no tokens)."""
    return duration(until_empty(lease.base.prev_tokens, 0, (now % 60) / 60))


def _window(counter: Counter) -> tuple[int, int, int, int]:
    return counter.prev_requests, counter.requests, counter.prev_tokens, counter.tokens


class Governor:
    """Admits requests against the limits of their key (or user) and team; see the module's doc.
    One per process and ledger (LMDB opens an environment once per process); thread-safe."""

    def __init__(self, ledger_dir: Path, costs: Costs):
        self.ledger_dir = Path(ledger_dir)
        self.costs = costs
        holders = self.ledger_dir / HOLDERS
        holders.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.ledger_dir), map_size=MAP_SIZE, subdir=True, sync=False, metasync=False,
                             writemap=True, map_async=True, max_dbs=0, max_readers=1024)
        self.holder, self._lock_fd = _hold(holders)
        self._prefix = _RESERVATION + self.holder.encode() + b":"
        self._serials = itertools.count(1)  # next() is atomic: threads may admit at once
        self._subjects: dict[int, tuple[Principal, list[Subject]]] = {}
        self._lock = threading.Lock()  # the leases below, shared by the threads that admit
        self._open: dict[str, Lease] = {}  # subject id -> the lease admitting its requests now
        self._closed: list[Lease] = []  # leases given back, waiting for their requests to settle
        self._lease_sizes: dict[str, int] = {}  # subject id -> requests its next lease is for
        self._load_throughput()

    def close(self) -> None:
        """Stop holding: every lease is given back (what requests still in flight hold, as unused), and
        this governor's reservations are released by the next sweep."""
        with self._lock:
            leases = [*self._open.values(), *self._closed]
            if leases:
                clock = Clock(time.time())
                with self.env.begin(write=True) as txn:
                    counters: dict[bytes, Counter] = {}
                    for lease in leases:
                        key = lease.subject.key
                        counter = counters[key] = counters.get(key) or self._counter(txn, key, clock)
                        _give_back(txn, lease, counter, clock, finished=True)
                    for key, counter in counters.items():
                        txn.put(key, _encode(counter))
            self._open.clear()
            self._closed.clear()
        self.env.close()
        (self.ledger_dir / HOLDERS / (self.holder + LOCK_SUFFIX)).unlink(missing_ok=True)
        os.close(self._lock_fd)

    # --- the hot path ---------------------------------------------------------

    def admit(self, principal: Principal, model: str, *, worst_tokens: int, worst_cost: float,
              now: float | None = None) -> Ticket:
        """Reserve `worst_tokens` and `worst_cost` against every limit of the principal's key (or
        user) and team, or reserve nothing and raise RateLimited or QuotaExceeded."""
        subjects = self._subjects_of(principal)
        if not subjects:
            return UNLIMITED
        now = time.time() if now is None else now
        with self._lock:
            leases = []
            for subject in subjects:  # written out, as settle below: on every request
                lease = self._open.get(subject.id)
                if (lease is None or not lease.record.open or now >= lease.expires or lease.requests <= 0
                        or lease.slots <= 0 or lease.tokens < worst_tokens or lease.cost < worst_cost):
                    return self._admit_in_ledger(subjects, worst_tokens, worst_cost, Clock(now))
                leases.append(lease)
            for lease in leases:
                lease.take(worst_tokens, worst_cost)
            headers = lease_headers(leases, now)
        return Ticket(b"", headers, leases=leases, worst_tokens=worst_tokens, worst_cost=worst_cost)

    def _admit_in_ledger(self, subjects: list[Subject], worst_tokens: int, worst_cost: float, clock: Clock) -> Ticket:
        """One write transaction: give back this process's finished and unfitting leases, check every
        limit, then grant leases where there is plenty of room, or else reserve this request alone."""
        refusal = None
        leases: list[Lease] = []
        with self.env.begin(write=True) as txn:
            counters, given_back = self._give_back_leases(txn, subjects, clock)
            try:
                for subject, counter in zip(subjects, counters):
                    _check(subject, counter, worst_tokens, worst_cost, clock)
            except (RateLimited, QuotaExceeded) as exc:
                refusal = exc
            if refusal is None:
                sizes = [min(self._lease_sizes.get(s.id, LEASE_START), _lease_room(s, c, worst_tokens, worst_cost, clock))
                         for s, c in zip(subjects, counters)]
                if min(sizes) >= LEASE_MIN:
                    leases = [self._grant(txn, s, c, n, worst_tokens, worst_cost, clock)
                              for s, c, n in zip(subjects, counters, sizes)]
                else:
                    ticket_id = self._prefix + next(self._serials).to_bytes(8, "big")
                    for counter in counters:
                        counter.in_flight += 1
                        counter.requests += 1
                        counter.tokens += worst_tokens
                        counter.reserved_tokens += worst_tokens
                        counter.reserved_cost += worst_cost
                    txn.put(ticket_id, _encode(Reservation([s.id for s in subjects], worst_tokens, worst_cost,
                                                           clock.minute)))
            for subject, counter in zip(subjects, counters):
                txn.put(subject.key, _encode(counter))
        given_back()  # committed: now this process forgets what it gave back
        if refusal is not None:
            if isinstance(refusal, RateLimited):  # room other workers lease comes back within LEASE_S
                refusal.held = any(c.leases for c in counters)
            raise refusal
        if leases:
            for subject, lease in zip(subjects, leases):
                self._open[subject.id] = lease
                lease.take(worst_tokens, worst_cost)
            return Ticket(b"", lease_headers(leases, clock.now), leases=leases, worst_tokens=worst_tokens,
                          worst_cost=worst_cost)
        headers = rate_headers(subjects, [_window(c) for c in counters], clock.into_minute)
        return Ticket(ticket_id, headers)

    def _grant(self, txn, subject: Subject, counter: Counter, n: int, worst_tokens: int, worst_cost: float,
               clock: Clock) -> Lease:
        """Room for n requests like this one, counted in the ledger now."""
        base = msgspec.structs.replace(counter)
        record = LeaseRecord(subject.id, n, n, n * worst_tokens, n * worst_cost, clock.minute)
        counter.in_flight += n
        counter.requests += n
        counter.tokens += record.tokens
        counter.reserved_tokens += record.tokens
        counter.reserved_cost += record.cost
        counter.leases += 1
        key = _LEASE + self.holder.encode() + b":" + next(self._serials).to_bytes(8, "big")
        txn.put(key, _encode(record))
        expires = min(clock.now + LEASE_S, (clock.minute + 1) * 60.0)
        return Lease(key, subject, record, base, clock.now, expires, n, n, record.tokens, record.cost)

    def _give_back_leases(self, txn, subjects: list[Subject], clock: Clock):
        """The subjects' counters, once this process has given back, in `txn`, its leases on them
        and what requests of its closed leases settled since (`_give_back`): everything, for a lease
        whose requests have all settled. Returns the counters and what to call once `txn` is committed."""
        closing = [lease for s in subjects if (lease := self._open.get(s.id)) is not None]
        finished = [lease for lease in self._closed if lease.in_flight == 0]
        settling = [lease for lease in self._closed if lease.in_flight and lease.slots]  # some settled since
        counters = {s.id: self._counter(txn, s.key, clock) for s in subjects}
        for lease in finished + settling + closing:
            subject_id = lease.subject.id
            if subject_id not in counters:
                counters[subject_id] = self._counter(txn, lease.subject.key, clock)
            _give_back(txn, lease, counters[subject_id], clock, finished=lease.in_flight == 0)
        asked = {s.id for s in subjects}  # the caller writes their counters
        for subject_id, counter in counters.items():
            if subject_id not in asked:
                txn.put(_SUBJECT + subject_id.encode(), _encode(counter))

        def given_back() -> None:
            for lease in closing:
                del self._open[lease.subject.id]
                self._adapt(lease, clock.now)
                _forget_given_back(lease)
                if lease.in_flight:
                    self._closed.append(lease)
            for lease in settling:
                _forget_given_back(lease)
            for lease in finished:
                self._closed.remove(lease)

        return [counters[s.id] for s in subjects], given_back

    def _adapt(self, lease: Lease, now: float) -> None:
        """The next lease of its subject: bigger when this one ran out early, smaller when it sat unused."""
        size = self._lease_sizes.get(lease.subject.id, LEASE_START)
        if now < lease.expires and now - lease.granted < LEASE_S / 2:
            size = min(size * 2, LEASE_MAX)
        elif lease.requests > lease.record.requests // 2:
            size = max(size // 2, LEASE_MIN)
        self._lease_sizes[lease.subject.id] = size

    def return_leases(self, now: float | None = None, every: bool = False) -> None:
        """Give back the leases of this process that are expired (or `every` one), and what requests
        of its closed leases settled since. The gateway calls it every second: idle room goes back
        to the other workers, and what their requests used is counted as spent."""
        clock = Clock(time.time() if now is None else now)
        with self._lock:
            expired = [lease.subject for lease in self._open.values() if every or clock.now >= lease.expires]
            if not expired and not any(lease.in_flight == 0 or lease.slots for lease in self._closed):
                return
            with self.env.begin(write=True) as txn:
                counters, given_back = self._give_back_leases(txn, expired, clock)
                for subject, counter in zip(expired, counters):
                    txn.put(subject.key, _encode(counter))
            given_back()

    def _counter(self, txn, key: bytes, clock: Clock) -> Counter:
        raw = txn.get(key)
        counter = _decode_counter(raw) if raw is not None else Counter()
        counter.roll(clock)
        return counter

    def _subjects_of(self, principal: Principal) -> list[Subject]:
        """subjects_of, once per principal (the key cache resolves each key's once and reuses it)."""
        cached = self._subjects.get(id(principal))
        if cached is not None and cached[0] is principal:
            return cached[1]
        if len(self._subjects) >= SUBJECTS_CACHED:
            self._subjects.clear()
        subjects = subjects_of(principal)
        self._subjects[id(principal)] = (principal, subjects)
        return subjects

    def settle(self, ticket: Ticket, *, tokens: int, cost: float, now: float | None = None) -> None:
        """Replace the ticket's reservation by what it really used (0 when nothing was generated)
        and free its parallel slot; once per ticket, whatever the number of calls."""
        if ticket.settled:
            return
        ticket.settled = True
        if ticket.leases is not None:
            back_tokens, back_cost = ticket.worst_tokens - tokens, ticket.worst_cost - cost
            with self._lock:
                for lease in ticket.leases:  # its slot and the rest of its worst case back; what it used
                    lease.slots += 1
                    lease.tokens += back_tokens
                    lease.cost += back_cost
                    lease.used_tokens += tokens
                    lease.used_cost += cost
                    lease.in_flight -= 1
            return
        clock = Clock(time.time() if now is None else now)
        with self.env.begin(write=True) as txn:
            raw = txn.pop(ticket.id)
            if raw is not None:
                _release(txn, _decode_reservation(raw), tokens, cost, clock)

    # --- off the event loop -------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Release the reservations of dead holders, drop LMDB's stale readers, and share this
        process's throughput measurements; returns how many reservations were released."""
        clock = Clock(time.time() if now is None else now)
        self.env.reader_check()
        released = 0
        with self.env.begin() as txn:
            holders = {key[2:].split(b":", 1)[0].decode() for prefix in (_RESERVATION, _LEASE)
                       for key in _keys(txn, prefix)}
        holders |= {path.name.removesuffix(LOCK_SUFFIX) for path in (self.ledger_dir / HOLDERS).glob("*" + LOCK_SUFFIX)}
        for holder in holders - {self.holder}:
            lock_fd = _dead(self.ledger_dir / HOLDERS / (holder + LOCK_SUFFIX))
            if lock_fd is None:
                continue
            try:
                with self.env.begin(write=True) as txn:
                    prefix = _RESERVATION + holder.encode() + b":"
                    for key in list(_keys(txn, prefix)):
                        _release(txn, _decode_reservation(txn.pop(key)), 0, 0.0, clock)
                        released += 1
                    for key in list(_keys(txn, _LEASE + holder.encode() + b":")):
                        _spend_lease(txn, _decode_lease(txn.pop(key)), clock)
                        released += 1
                (self.ledger_dir / HOLDERS / (holder + LOCK_SUFFIX)).unlink(missing_ok=True)
            finally:
                if lock_fd >= 0:
                    os.close(lock_fd)
        self._share_throughput()
        return released

    def seed_from_usage(self, db: sqlite_utils.Database, now: float | None = None) -> bool:
        """A new ledger (none, or deleted) starts from the usage table's totals for the current
        day and month; returns whether it did. Blocking: call it off the event loop."""
        with self.env.begin() as txn:
            if txn.get(_SEEDED) is not None:
                return False
        clock = Clock(time.time() if now is None else now)
        month_start, day_start = clock.period_start("month"), clock.period_start("day")
        totals: dict[str, list] = {}
        for subject, ts, tokens, cost in _usage_since(db, month_start):
            entry = totals.setdefault(subject, [0, 0.0, 0, 0.0])
            entry[0] += tokens
            entry[1] += cost
            if ts >= day_start:
                entry[2] += tokens
                entry[3] += cost
        with self.env.begin(write=True) as txn:
            if txn.get(_SEEDED) is not None:
                return False  # another worker did it meanwhile
            for subject, (month_tokens, month_cost, day_tokens, day_cost) in totals.items():
                key = _SUBJECT + subject.encode()
                raw = txn.get(key)
                counter = _decode_counter(raw) if raw is not None else Counter()
                counter.roll(clock)
                counter.month_tokens, counter.month_cost = month_tokens, month_cost
                counter.day_tokens, counter.day_cost = day_tokens, day_cost
                txn.put(key, _encode(counter))
            txn.put(_SEEDED, _encode(clock.now))
        return True

    def usage(self, subject: str, now: float | None = None) -> Counter:
        """A subject's counters as of `now` (k:<key id> or t:<team id>): `usages` of one."""
        return self.usages([subject], now)[subject]

    def usages(self, subjects: list[str], now: float | None = None) -> dict[str, Counter]:
        """The counters of `subjects` as of `now`, read in one transaction once this process has given
        back its leases, so what its settled requests used is spent. Another worker counts what its
        requests used as reserved, not yet spent, while the lease they came from is open and until
        its next give-back: at its next ledger transaction, or its next return_leases once the lease
        expired (within LEASE_S) or the request settled. A subject never counted is all zeros.
        Blocking: call it off the event loop."""
        self.return_leases(now, every=True)
        clock = Clock(time.time() if now is None else now)
        counters = {}
        with self.env.begin() as txn:
            for subject in subjects:
                counters[subject] = self._counter(txn, _SUBJECT + subject.encode(), clock)
        return counters

    # --- throughput (appliance/costs.py), kept in the ledger ---------------

    def _share_throughput(self) -> None:
        pending = self.costs.throughput.take_pending()
        estimates = {}
        with self.env.begin(write=True) as txn:
            for model, windows in pending.items():
                key = _THROUGHPUT + model.encode()
                raw = txn.get(key)
                state = _decode_window(raw) if raw is not None else WindowState()
                for window, (tokens, intervals) in sorted(windows.items()):
                    state.add(window, tokens, sorted(intervals))
                txn.put(key, _encode(state))
            for key, raw in _items(txn, _THROUGHPUT):
                if (estimate := _decode_window(raw).estimate) is not None:
                    estimates[key[len(_THROUGHPUT):].decode()] = estimate
        self.costs.throughput.apply(estimates)

    def _load_throughput(self) -> None:
        with self.env.begin() as txn:
            estimates = {key[len(_THROUGHPUT):].decode(): e for key, raw in _items(txn, _THROUGHPUT)
                         if (e := _decode_window(raw).estimate) is not None}
        self.costs.throughput.apply(estimates)


def _check(subject: Subject, counter: Counter, worst_tokens: int, worst_cost: float, clock: Clock) -> None:
    limits, who = subject.limits, subject.label
    if limits.max_parallel is not None and counter.in_flight + 1 > limits.max_parallel:
        raise RateLimited(f"Too many parallel requests for {who}: its limit is {limits.max_parallel} at once "
                          f"(max_parallel). Wait for one to finish.", retry_after=1.0, type="requests")
    if limits.rpm is not None:
        wait = wait_until_fits(counter.prev_requests, counter.requests, 1, limits.rpm, clock.into_minute)
        if wait > 0:
            raise RateLimited(f"Rate limit reached for {who}: {limits.rpm} requests per minute (rpm). "
                              f"Try again in {duration(wait)}.", retry_after=wait, type="requests",
                              limits=dict(_rate("requests", limits.rpm, counter.prev_requests, counter.requests, clock.into_minute)))
    if limits.tpm is not None:
        wait = wait_until_fits(counter.prev_tokens, counter.tokens, worst_tokens, limits.tpm, clock.into_minute)
        if wait > 0:
            too_big = worst_tokens > limits.tpm
            reason = (f"this request may use up to {worst_tokens} tokens, more than the limit itself; lower "
                      f"max_tokens" if too_big else f"Try again in {duration(wait)}")
            raise RateLimited(f"Rate limit reached for {who}: {limits.tpm} tokens per minute (tpm); {reason}.",
                              retry_after=wait, type="tokens",
                              limits=dict(_rate("tokens", limits.tpm, counter.prev_tokens, counter.tokens, clock.into_minute)))
    spent_tokens, spent_cost = counter.spent(limits.period)
    if limits.budget_tokens is not None and spent_tokens + counter.reserved_tokens + worst_tokens > limits.budget_tokens:
        left = max(0, limits.budget_tokens - spent_tokens - counter.reserved_tokens)
        raise QuotaExceeded(f"The token budget of {who} for this {limits.period} ({limits.budget_tokens} tokens, "
                            f"budget_tokens) has {left} tokens left, fewer than this request may use ({worst_tokens}).",
                            retry_after=clock.period_end(limits.period) - clock.now,
                            held=spent_tokens + worst_tokens <= limits.budget_tokens)
    if limits.budget_cost is not None and spent_cost + counter.reserved_cost + worst_cost > limits.budget_cost:
        left = max(0.0, limits.budget_cost - spent_cost - counter.reserved_cost)
        raise QuotaExceeded(f"The cost budget of {who} for this {limits.period} ({limits.budget_cost:g}, "
                            f"budget_cost) has {left:.6g} left, less than this request may cost ({worst_cost:.6g}).",
                            retry_after=clock.period_end(limits.period) - clock.now,
                            held=spent_cost + worst_cost <= limits.budget_cost)


def _release(txn: lmdb.Transaction, reservation: Reservation, tokens: int, cost: float, clock: Clock) -> None:
    """Give back a reservation and count what was really used, in the current period."""
    for subject in reservation.subjects:
        key = _SUBJECT + subject.encode()
        raw = txn.get(key)
        if raw is None:
            continue
        counter = _decode_counter(raw)
        counter.roll(clock)
        counter.in_flight = max(0, counter.in_flight - 1)
        counter.reserved_tokens = max(0, counter.reserved_tokens - reservation.tokens)
        counter.reserved_cost = max(0.0, counter.reserved_cost - reservation.cost)
        _spend(counter, tokens, cost)
        _uncount(counter, reservation.minute, 0, reservation.tokens - tokens)  # the window counted the worst case
        txn.put(key, _encode(counter))


def _lease_room(subject: Subject, counter: Counter, worst_tokens: int, worst_cost: float, clock: Clock) -> int:
    """How many requests like this one a lease may take from the subject: 1/LEASE_SHARE of what
    each of its limits has left (all of them count, even those that only rate-limit)."""
    limits, room = subject.limits, LEASE_MAX
    if limits.max_parallel is not None:
        room = min(room, (limits.max_parallel - counter.in_flight) // LEASE_SHARE)
    if limits.rpm is not None:
        room = min(room, int((limits.rpm - windowed(counter.prev_requests, counter.requests, clock.into_minute)) / LEASE_SHARE))
    if limits.tpm is not None:
        left = limits.tpm - windowed(counter.prev_tokens, counter.tokens, clock.into_minute)
        room = min(room, int(left / LEASE_SHARE / max(worst_tokens, 1)))
    spent_tokens, spent_cost = counter.spent(limits.period)
    if limits.budget_tokens is not None:
        left = limits.budget_tokens - spent_tokens - counter.reserved_tokens
        room = min(room, int(left / LEASE_SHARE / max(worst_tokens, 1)))
    if limits.budget_cost is not None and worst_cost > 0:
        left = limits.budget_cost - spent_cost - counter.reserved_cost
        room = min(room, int(left / LEASE_SHARE / worst_cost))
    return room


def _unheld(lease: Lease) -> tuple[int, int, int, float]:
    """What a lease holds that no request in flight does (slots, requests, tokens, cost): its free
    room while open; once closed, the slots and unused worst cases its settled requests brought back."""
    return lease.slots, lease.requests, max(lease.tokens, 0), max(lease.cost, 0.0)


def _kept(lease: Lease) -> LeaseRecord:
    """The lease's record once `_unheld` goes back and what its settled requests used is spent:
    closed, holding what its requests in flight hold."""
    record = lease.record
    slots, requests, tokens, cost = _unheld(lease)
    return LeaseRecord(record.subject, record.slots - slots, record.requests - requests,
                       record.tokens - (tokens + lease.used_tokens), record.cost - (cost + lease.used_cost),
                       record.minute, open=False)


def _forget_given_back(lease: Lease) -> None:
    """This process's side of _give_back, once the ledger has it."""
    lease.record = _kept(lease)
    lease.slots = lease.requests = 0
    lease.tokens, lease.cost = min(lease.tokens, 0), min(lease.cost, 0.0)
    lease.used_tokens, lease.used_cost = 0, 0.0


def _give_back(txn: lmdb.Transaction, lease: Lease, counter: Counter, clock: Clock, *, finished: bool) -> None:
    """Into `counter` and the lease's record: what the lease holds that no request in flight does
    (`_unheld`), and what its settled requests used, counted as spent, so the ledger's spending lags
    a worker's requests only until its next give-back; once its requests are `finished` (or at a
    close), the whole record, what requests still in flight hold going back as unused."""
    record = lease.record
    slots, requests, tokens, cost = _unheld(lease)
    if record.open:
        counter.leases = max(0, counter.leases - 1)
    if finished:  # the whole record in one subtraction each: no float dust left in reserved_cost
        txn.delete(lease.key)
        counter.in_flight = max(0, counter.in_flight - record.slots)
        counter.reserved_tokens = max(0, counter.reserved_tokens - record.tokens)
        counter.reserved_cost = max(0.0, counter.reserved_cost - record.cost)
        _uncount(counter, record.minute, requests, record.tokens - lease.used_tokens)  # the window counted worst cases
    else:
        txn.put(lease.key, _encode(_kept(lease)))
        counter.in_flight = max(0, counter.in_flight - slots)
        counter.reserved_tokens = max(0, counter.reserved_tokens - (tokens + lease.used_tokens))
        counter.reserved_cost = max(0.0, counter.reserved_cost - (cost + lease.used_cost))  # as _kept does
        _uncount(counter, record.minute, requests, tokens)
    _spend(counter, lease.used_tokens, lease.used_cost)


def _spend_lease(txn: lmdb.Transaction, record: LeaseRecord, clock: Clock) -> None:
    """A dead holder's lease: all it held counts as spent (what it handed out died with it)."""
    key = _SUBJECT + record.subject.encode()
    raw = txn.get(key)
    if raw is None:
        return
    counter = _decode_counter(raw)
    counter.roll(clock)
    counter.leases = max(0, counter.leases - record.open)
    counter.in_flight = max(0, counter.in_flight - record.slots)
    counter.reserved_tokens = max(0, counter.reserved_tokens - record.tokens)
    counter.reserved_cost = max(0.0, counter.reserved_cost - record.cost)
    _spend(counter, record.tokens, record.cost)
    txn.put(key, _encode(counter))


def _spend(counter: Counter, tokens: int, cost: float) -> None:
    counter.day_tokens += tokens
    counter.month_tokens += tokens
    counter.day_cost += cost
    counter.month_cost += cost


def _uncount(counter: Counter, minute: int, requests: int, tokens: int) -> None:
    """Take requests and tokens counted in `minute` off the per-minute window (negative: add them)."""
    if minute == counter.minute:
        counter.requests = max(0, counter.requests - requests)
        counter.tokens = max(0, counter.tokens - tokens)
    elif minute == counter.minute - 1:
        counter.prev_requests = max(0, counter.prev_requests - requests)
        counter.prev_tokens = max(0, counter.prev_tokens - tokens)


def _keys(txn: lmdb.Transaction, prefix: bytes) -> Iterator[bytes]:
    for key, _ in _items(txn, prefix):
        yield key


def _items(txn: lmdb.Transaction, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    cursor = txn.cursor()
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not key.startswith(prefix):
            return
        yield key, value


def _usage_since(db: sqlite_utils.Database, since: float) -> Iterator[tuple[str, float, int, float]]:
    """(subject, ts, tokens, cost) of every usage row since `since`: once for its key and once
    for its team."""
    rows = db.execute(
        "SELECT key_id, team_id, ts, coalesce(total_tokens, 0), coalesce(cost, 0) FROM usage WHERE ts >= ?", [since],
    )
    for key_id, team_id, ts, tokens, cost in rows:
        if key_id is not None:
            yield KEY_SUBJECT + key_id, ts, tokens, cost
        if team_id is not None:
            yield TEAM_SUBJECT + team_id, ts, tokens, cost


def _hold(directory: Path) -> tuple[str, int]:
    """A lock file of this governor's own, created and locked before it gets its name."""
    holder = os.urandom(8).hex()
    path = directory / (holder + LOCK_SUFFIX)
    creating = path.with_suffix(".new")
    fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(creating, path)
    return holder, fd


def _dead(path: Path) -> int | None:
    """Whether the holder of the lock file `path` is gone: None if it lives; else -1 when its
    file is gone, or the descriptor now locked by us (close it once its holds are released)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
