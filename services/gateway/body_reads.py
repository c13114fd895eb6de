"""Request bodies being read, timed without a timer each (gateway.body_timeout_s).

A client that announces a body and sends it slowly, or not at all, would hold a request
forever. Each read of a body (the whole body on the OpenAI routes, each chunk on the
Litestar routes, so a long upload is timed by its silences, not its length) sits in one
set while it waits; one sweep walks the set every SWEEP_S and cancels a read waiting
longer than the timeout, which then raises RequestTimeout (408). A body that has already
arrived costs a set insert and removal, never an event-loop timer (see inflight.py for
why timers matter on the hot path).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from time import perf_counter
from typing import TypeVar

from granian.rsgi import ProtocolClosed, ProtocolError

from appliance.errors import RequestTimeout

SWEEP_S = 0.25
LINGER_BYTES = 16 * 1024 * 1024  # what an early answer still drains past the body limit

T = TypeVar("T")


class BodyRead:
    __slots__ = ("task", "since", "expired_after")

    def __init__(self, task: asyncio.Task):
        self.task, self.since = task, perf_counter()
        self.expired_after: float | None = None  # the timeout, once the sweep cancelled it


READS: set[BodyRead] = set()  # of this process: one gateway per Granian worker


async def timed(read: Awaitable[T]) -> T:
    """`await read`, or RequestTimeout once it has waited longer than the sweep allows."""
    task = asyncio.current_task()
    watched = BodyRead(task)
    READS.add(watched)
    try:
        return await read
    except asyncio.CancelledError:
        if watched.expired_after is None:
            raise
        task.uncancel()
        raise RequestTimeout(
            f"The request body did not arrive within {watched.expired_after:g} s (gateway.body_timeout_s)."
        ) from None
    finally:
        READS.discard(watched)


async def expire_reads(timeout_s: float) -> None:
    """Cancel every read that has waited longer than `timeout_s`; runs for the gateway's life."""
    while True:
        await asyncio.sleep(SWEEP_S)
        now = perf_counter()
        for watched in [w for w in READS if now - w.since >= timeout_s and w.expired_after is None]:
            watched.expired_after = timeout_s
            watched.task.cancel()


async def drain(body: AsyncIterator[bytes], limit: int) -> None:
    """Read and drop what is left of a request body before an early answer (401, 404, 413,
    ...): a connection closed on unread bytes is reset, and the client may lose the answer
    with it. Up to LINGER_BYTES past `limit`, so a body somewhat over the limit still hears
    its 413. A client gone, a body already read (ProtocolError) or one slower than
    gateway.body_timeout_s ends the draining."""
    read = 0
    with contextlib.suppress(ProtocolError, ProtocolClosed, RequestTimeout, StopAsyncIteration):
        while read <= limit + LINGER_BYTES:
            read += len(await timed(body.__anext__()))
