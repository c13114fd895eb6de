"""Each local model's engine slots, and the requests waiting for one.

A model's capacity is what its healthy replicas can run at once: each replica's slots
(llama.cpp's --parallel, vLLM's --max-num-seqs, as the plan sized them). A request beyond
it waits in the model's queue, interactive before batch (a key's or team's `priority`),
first come first served within a class, for at most queue.max_wait_s (then 503
queue_timeout). A full queue (queue.max_waiting) sheds at once with 429 model_overloaded,
unless the newcomer outranks a waiting request: then the latest of the lowest class is shed
instead. Both say Retry-After; a route tries its next model instead (overload is one of the
failures a fallback takes). Remote upstreams and engines of unknown slots are not queued here.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from time import perf_counter

from appliance.config import QueueConfig
from appliance.errors import Overloaded, QueueTimeout

PRIORITIES = {"interactive": 0, "batch": 1}


class ModelQueue:
    __slots__ = ("name", "config", "capacity", "active", "_waiting", "_arrivals", "on_change")

    def __init__(self, name: str, config: QueueConfig, capacity: int | None, on_change=None):
        self.name, self.config = name, config
        self.capacity = capacity  # None: not limited here
        self.active = 0  # slots taken
        self._waiting: list[list] = []  # heap of [priority, arrival, future]
        self._arrivals = itertools.count()
        self.on_change = on_change  # called with the queue when its depth changes

    @property
    def depth(self) -> int:
        return len(self._waiting)

    async def acquire(self, priority: int) -> float:
        """Take a slot, waiting for one if all are taken; returns the seconds waited."""
        if self.capacity is None or (self.active < self.capacity and not self._waiting):
            self.active += 1
            return 0.0
        if len(self._waiting) >= self.config.max_waiting:
            if not self._waiting:  # max_waiting 0: nothing waits
                raise self._overloaded()
            worst = max(self._waiting)
            if worst[0] <= priority:
                raise self._overloaded()
            self._drop(worst)
            worst[2].set_exception(self._overloaded())
        entry = [priority, next(self._arrivals), asyncio.get_running_loop().create_future()]
        heapq.heappush(self._waiting, entry)
        self._changed()
        started, handed = perf_counter(), entry[2]
        try:
            await asyncio.wait_for(asyncio.shield(handed), self.config.max_wait_s)
        except TimeoutError:
            if not _given(handed):  # else a slot came just as the time was up
                self._drop(entry)
                raise QueueTimeout(f"The model '{self.name}' stayed busy: this request waited "
                                   f"{self.config.max_wait_s:g} s (queue.max_wait_s) for an engine slot.",
                                   retry_after=self._retry_after()) from None
        except asyncio.CancelledError:  # the client left
            if _given(handed):
                self.release()  # handed a slot just as it was cancelled
            else:
                self._drop(entry)
            raise
        return perf_counter() - started

    def take_free(self) -> ModelQueue:
        """A slot only if one is free and nobody waits (a shadow copy never queues); else Overloaded."""
        if self.capacity is not None and (self.active >= self.capacity or self._waiting):
            raise self._overloaded()
        self.active += 1
        return self

    def release(self) -> None:
        self.active -= 1
        self._hand_on()

    def resize(self, capacity: int | None) -> None:
        """What the healthy replicas can run now."""
        self.capacity = capacity
        self._hand_on()

    def _hand_on(self) -> None:
        handed = False
        while self._waiting and (self.capacity is None or self.active < self.capacity):
            entry = heapq.heappop(self._waiting)
            self.active += 1
            entry[2].set_result(None)
            handed = True
        if handed:
            self._changed()

    def _drop(self, entry: list) -> None:
        if entry in self._waiting:
            self._waiting.remove(entry)
            heapq.heapify(self._waiting)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _retry_after(self) -> int:
        """A guess: a second per slot's worth of waiting requests."""
        return max(1, math.ceil(len(self._waiting) / max(1, self.capacity or 1)))

    def _overloaded(self) -> Overloaded:
        return Overloaded(f"The model '{self.name}' is overloaded: its engines are busy and {len(self._waiting)} "
                          "requests wait already (queue.max_waiting); retry later.", retry_after=self._retry_after())


def _given(handed: asyncio.Future) -> bool:
    return handed.done() and handed.exception() is None
