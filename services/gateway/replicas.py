"""Engine replicas behind each served model: health checks and round-robin choice."""

from __future__ import annotations

import asyncio
import itertools
import logging

import aiohttp
import yarl

from appliance.errors import ServiceUnavailable
from services.gateway.runtime import ReplicaEndpoint, ServedModel

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
FAILURES_TO_UNHEALTHY = 2  # one slow probe is not an outage; a refused connection is
CONNECT_TIMEOUT_S = 5.0
# Only connecting has an aiohttp timeout (it arms no timer on a pooled connection); engine
# deadlines are kept by one ticker for all requests (services/gateway/inflight.py).
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)


class Replica:
    def __init__(self, model: str, endpoint: ReplicaEndpoint):
        self.model = model
        self.base_url = endpoint.base_url.rstrip("/")
        self.health_url = endpoint.health_url or self.base_url + "/models"
        key = endpoint.resolved_key()
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.healthy = False
        self.failures = 0
        self._urls: dict[str, yarl.URL] = {}

    def url(self, path: str) -> yarl.URL:
        """The replica's URL for an API path, parsed once: aiohttp parses a str URL on every request."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = yarl.URL(self.base_url + path)
        return url

    def record_probe(self, outcome: str) -> None:
        """outcome: 'ok', 'refused' (nothing listens) or 'failed' (error or timeout)."""
        if outcome == "ok":
            self.failures, healthy = 0, True
        else:
            self.failures += 1
            healthy = self.healthy and outcome != "refused" and self.failures < FAILURES_TO_UNHEALTHY
        if healthy != self.healthy:
            log.info("%s is now %s", self, "healthy" if healthy else f"unhealthy ({outcome})")
        self.healthy = healthy

    def __repr__(self) -> str:
        return f"Replica({self.model} @ {self.base_url}, healthy={self.healthy})"


class ModelPool:
    """The replicas of one served model; picks healthy ones in turn."""

    def __init__(self, served: ServedModel):
        self.served = served
        self.replicas = [Replica(served.name, r) for r in served.replicas]
        self._turn = itertools.cycle(range(len(self.replicas)))
        self.timeout_s = served.request_timeout_s  # enforced by services/gateway/inflight.py

    @property
    def healthy_count(self) -> int:
        return sum(r.healthy for r in self.replicas)

    def pick(self) -> Replica:
        for _ in range(len(self.replicas)):
            replica = self.replicas[next(self._turn)]
            if replica.healthy:
                return replica
        raise ServiceUnavailable(
            f"The model '{self.served.name}' has no healthy replica right now; retry shortly.", retry_after=2
        )


async def probe(session: aiohttp.ClientSession, replica: Replica) -> str:
    try:
        async with session.get(
            replica.health_url, headers=replica.headers, timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        ) as resp:
            await resp.read()
            return "ok" if resp.status == 200 else "failed"
    except aiohttp.ClientConnectorError:
        return "refused"
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return "failed"


async def watch_health(session: aiohttp.ClientSession, pools: dict[str, ModelPool], interval_s: float, on_probed) -> None:
    """Probe every replica forever; call on_probed(pool) after each round of a model's probes."""
    while True:
        for pool in list(pools.values()):  # deployments come and go meanwhile
            outcomes = await asyncio.gather(*(probe(session, r) for r in pool.replicas))
            for replica, outcome in zip(pool.replicas, outcomes):
                replica.record_probe(outcome)
            on_probed(pool)  # also publishes what failed requests marked down in between
        await asyncio.sleep(interval_s)
