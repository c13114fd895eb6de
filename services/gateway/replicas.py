"""Engine replicas behind each served model: health checks and round-robin choice."""

from __future__ import annotations

import asyncio
import itertools
import logging

import aiohttp

from appliance.errors import ServiceUnavailable
from services.gateway.runtime import ReplicaEndpoint, ServedModel

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0


class Replica:
    def __init__(self, model: str, endpoint: ReplicaEndpoint):
        self.model = model
        self.base_url = endpoint.base_url.rstrip("/")
        key = endpoint.resolved_key()
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.healthy = False
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"Replica({self.model} @ {self.base_url}, healthy={self.healthy})"


class ModelPool:
    """The replicas of one served model; picks healthy ones in turn."""

    def __init__(self, served: ServedModel):
        self.served = served
        self.replicas = [Replica(served.name, r) for r in served.replicas]
        self._turn = itertools.cycle(range(len(self.replicas)))
        self.timeout_s = served.request_timeout_s
        self.plain_timeout = aiohttp.ClientTimeout(total=self.timeout_s, connect=CONNECT_TIMEOUT_S)
        # A stream may run long; what must not happen is a silence longer than the timeout.
        self.stream_timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=self.timeout_s)

    @property
    def healthy_count(self) -> int:
        return sum(r.healthy for r in self.replicas)

    def pick(self, exclude: Replica | None = None) -> Replica:
        for _ in range(len(self.replicas)):
            replica = self.replicas[next(self._turn)]
            if replica.healthy and replica is not exclude:
                return replica
        raise ServiceUnavailable(
            f"The model '{self.served.name}' has no healthy replica right now; retry shortly.", retry_after=2
        )


async def check_replica(session: aiohttp.ClientSession, replica: Replica) -> bool:
    try:
        async with session.get(
            replica.base_url + "/models", headers=replica.headers, timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def watch_health(session: aiohttp.ClientSession, pools: dict[str, ModelPool], interval_s: float, on_change) -> None:
    """Probe every replica forever; call on_change(pool) when a model's healthy count changes."""
    while True:
        for pool in pools.values():
            before = pool.healthy_count
            results = await asyncio.gather(*(check_replica(session, r) for r in pool.replicas))
            for replica, ok in zip(pool.replicas, results):
                if ok != replica.healthy:
                    log.info("%s is now %s", replica, "healthy" if ok else "unhealthy")
                replica.healthy = ok
            if pool.healthy_count != before:
                on_change(pool)
        await asyncio.sleep(interval_s)
