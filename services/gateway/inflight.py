"""Requests in flight, watched by one ticker: client disconnects and engine deadlines.

Event-loop timers were the largest cost of a quick request after the HTTP work itself:
one for the engine timeout (aiohttp's, re-armed on every read of a stream) and one to
start watching for a disconnect (docs/benchmarks.md). Instead every request in flight
sits in one set that a single ticker walks every TICK_S: it starts watching for a
disconnect once a request has run WATCH_AFTER_S (quick answers never pay for the watch),
and cancels a request whose engine is past its deadline. Both are noticed within a tick.
"""

from __future__ import annotations

import asyncio
from time import perf_counter

from granian.rsgi import HTTPProtocol

from services.gateway.proxy import Call

TICK_S = 0.05
WATCH_AFTER_S = 0.05


class InFlight:
    """One request being answered. `client_gone` says why its task was cancelled when
    the client left; an engine deadline sets `call.timed_out` instead (see proxy.py)."""

    __slots__ = ("call", "task", "proto", "waiter", "armed", "client_gone")

    def __init__(self, call: Call, proto: HTTPProtocol, task: asyncio.Task):
        self.call, self.proto, self.task = call, proto, task
        self.waiter: asyncio.Future | None = None
        self.armed = True
        self.client_gone = False

    def tick(self, now: float) -> None:
        call = self.call
        if call.deadline is not None and now >= call.deadline and not call.timed_out:
            call.timed_out = True
            self.task.cancel()
        elif self.waiter is None and self.armed and now - call.started >= WATCH_AFTER_S:
            self.waiter = asyncio.ensure_future(self.proto.client_disconnect())
            self.waiter.add_done_callback(self._on_disconnect)

    def _on_disconnect(self, done: asyncio.Future) -> None:
        if self.armed and not done.cancelled() and done.exception() is None:
            self.client_gone = True
            self.task.cancel()

    def disarm(self) -> None:
        """The answer is complete: a client that hangs up now cancels nothing."""
        self.armed = False


class Ticker:
    def __init__(self):
        self.flights: set[InFlight] = set()

    def track(self, call: Call, proto: HTTPProtocol) -> InFlight:
        flight = InFlight(call, proto, asyncio.current_task())
        self.flights.add(flight)
        return flight

    def untrack(self, flight: InFlight) -> None:
        self.flights.discard(flight)
        flight.armed = False
        if flight.waiter is not None:
            flight.waiter.cancel()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = perf_counter()
            for flight in list(self.flights):
                flight.tick(now)
