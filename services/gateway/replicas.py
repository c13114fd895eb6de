"""Engine replicas behind each served model: health checks, what their supervisor
reports (services/engines/status.py), their circuit breakers (services/gateway/breakers.py),
which replica takes a request, and what a llama.cpp model's chat template can do (its
server's GET /props, read once).

A model's `balance` chooses among the replicas that pass their health check and whose
breaker lets a request through:
- least_busy: the fewest requests in flight per engine slot, ties taken in turn (at low
  load, round-robin);
- round_robin: in turn;
- prefix_affinity: the replica that served the request's session (the x-session-id header)
  or prompt prefix before, so the engine's prompt cache already holds it. A new one goes to
  the first replica in its rendezvous-hash order that holds no more than its even share of
  the prefixes (consistent hashing with bounded loads: the workers of a gateway mostly
  agree, and the prefixes, hence the prompt caches, are spread evenly); a replica with more
  than AFFINITY_LOAD times its share of the requests in flight passes a request on to the
  next in that order for the time being. The last AFFINITY_KEYS prefixes of a model are
  remembered (bounded memory); those of a replica that leaves go to the others.
Whatever the balance, a replica running all its engine slots takes a request only when every
replica does (the model's queue, services/gateway/queueing.py, keeps that rare).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections import OrderedDict

import aiohttp
import yarl

from appliance.config import BreakerConfig, QueueConfig
from appliance.errors import ServiceUnavailable
from services.engines.process import FAILED, READY
from services.engines.status import ReplicaStatus
from services.gateway.breakers import Breaker
from services.gateway.cache import ResponseCache
from services.gateway.queueing import ModelQueue
from services.gateway.runtime import ReplicaEndpoint, ServedModel

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
FAILURES_TO_UNHEALTHY = 2  # one slow probe is not an outage; a refused connection is
CONNECT_TIMEOUT_S = 5.0
# Only connecting has an aiohttp timeout (it arms no timer on a pooled connection); engine
# deadlines are kept by one ticker for all requests (services/gateway/inflight.py).
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
AFFINITY_LOAD = 1.25  # prefix_affinity: how far above its share of the load a replica still takes its prefixes
AFFINITY_KEYS = 4096  # prefixes and sessions remembered per model, the least recently seen forgotten first


class Replica:
    def __init__(self, model: str, endpoint: ReplicaEndpoint, closes_after_streams: bool = False,
                 breaker: BreakerConfig | None = None, on_breaker=None):
        self.model = model
        self.base_url = endpoint.base_url.rstrip("/")
        self.health_url = endpoint.health_url or self.base_url + "/models"
        key = endpoint.resolved_key()
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        # llama.cpp's server closes a connection after a streamed answer without saying so;
        # one kept for reuse would fail the next request that took it.
        self.stream_headers = {**self.headers, "Connection": "close"} if closes_after_streams else self.headers
        self.probe_ok = False
        self.status: ReplicaStatus | None = None  # None: nothing supervises it here (remote, systemd)
        self.failures = 0
        self.in_flight = 0  # requests sent to it and not finished
        self.homes = 0  # prefixes and sessions it is the home of (prefix_affinity)
        self.slots = endpoint.slots
        self.breaker = Breaker(breaker or BreakerConfig(), f"{model} @ {self.base_url}",
                               on_change=(lambda _: on_breaker(self)) if on_breaker else None)
        self.hash_key = hashlib.blake2b(self.base_url.encode(), digest_size=16).digest()  # prefix_affinity
        self._urls: dict[str, yarl.URL] = {}

    @property
    def healthy(self) -> bool:
        """Routable: it answers its health check, and its supervisor (if any) counts it ready."""
        return self.probe_ok and (self.status is None or self.status.state == READY)

    @property
    def failed(self) -> bool:
        return self.status is not None and self.status.state == FAILED

    def readiness(self) -> dict:
        """Its line in /readyz."""
        out = {"healthy": self.healthy, "base_url": self.base_url, "breaker": self.breaker.state,
               "in_flight": self.in_flight}
        if self.status is not None:
            out |= {"replica": self.status.replica, "state": self.status.state, "restarts": self.status.restarts}
            if self.status.last_exit:
                out["last_exit"] = self.status.last_exit
            if self.status.reason:
                out["reason"] = self.status.reason
        return out

    def url(self, path: str) -> yarl.URL:
        """The replica's URL for an API path, parsed once: aiohttp parses a str URL on every request."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = yarl.URL(self.base_url + path)
        return url

    def record_probe(self, outcome: str) -> None:
        """outcome: 'ok', 'refused' (nothing listens) or 'failed' (error or timeout)."""
        if outcome == "ok":
            self.failures, probe_ok = 0, True
        else:
            self.failures += 1
            probe_ok = self.probe_ok and outcome != "refused" and self.failures < FAILURES_TO_UNHEALTHY
        if probe_ok != self.probe_ok:
            log.info("%s now %s its health check", self, "passes" if probe_ok else f"fails ({outcome})")
        self.probe_ok = probe_ok

    def __repr__(self) -> str:
        return f"Replica({self.model} @ {self.base_url}, healthy={self.healthy})"


class ModelPool:
    """The replicas of one served model, and which of them takes a request."""

    def __init__(self, served: ServedModel, breaker: BreakerConfig | None = None, on_breaker=None,
                 queue: QueueConfig | None = None, on_queue=None, workers: int = 1):
        self.served = served
        self.workers = workers  # gateway workers sharing the engines: each takes its share of the slots
        self.replicas = [Replica(served.name, r, closes_after_streams=served.engine == "llamacpp", breaker=breaker,
                                 on_breaker=on_breaker) for r in served.replicas]
        self._turn = 0
        self._homes: OrderedDict[bytes, Replica] = OrderedDict()  # prefix_affinity: prefix -> its replica
        self.queue = ModelQueue(served.name, queue or QueueConfig(), self.capacity(), on_queue)
        self.cache = ResponseCache(served.cache) if served.cache else None
        self.timeout_s = served.request_timeout_s  # enforced by services/gateway/inflight.py
        # Whether the engine renders `tools` itself; None: not known (yet), or not llama.cpp.
        self.native_tools: bool | None = None

    def capacity(self) -> int | None:
        """This worker's share of what the healthy replicas run at once (rounded up); None: not
        limited here (a remote upstream, an engine of unknown slots) or no healthy replica (a
        request fails at once, not after a wait)."""
        if any(r.slots is None for r in self.replicas):
            return None
        return math.ceil(sum(r.slots for r in self.replicas if r.healthy) / self.workers) or None

    @property
    def healthy_count(self) -> int:
        return sum(r.healthy for r in self.replicas)

    @property
    def failed_count(self) -> int:
        return sum(r.failed for r in self.replicas)

    def pick(self, affinity: bytes | None = None) -> Replica:
        """The replica for a request (the model's `balance`); `affinity`: its session or prompt prefix."""
        replicas = self.replicas
        if len(replicas) == 1:
            replica = replicas[0]
            if replica.healthy and replica.breaker.allows():
                return replica
            raise self.unavailable()
        if affinity is not None and self.served.balance == "prefix_affinity":
            return self._by_affinity(affinity)
        count, start = len(replicas), self._turn
        self._turn = (start + 1) % count
        least = self.served.balance == "least_busy"
        best = rank = None
        for i in range(count):
            replica = replicas[(start + i) % count]
            if not (replica.healthy and replica.breaker.allows()):
                continue
            # A replica running all its engine slots is taken only when every one is; least_busy
            # weighs the requests in flight by the slots.
            ranked = (replica.slots is not None and replica.in_flight >= replica.slots,
                      replica.in_flight / (replica.slots or 1) if least else 0)
            if best is None or ranked < rank:
                best, rank = replica, ranked
                if ranked == (False, 0):
                    break
        if best is None:
            raise self.unavailable()
        return best

    def _by_affinity(self, affinity: bytes) -> Replica:
        usable = [r for r in self.replicas if r.healthy and r.breaker.allows()]
        if not usable:
            raise self.unavailable()
        bound = math.ceil(AFFINITY_LOAD * (sum(r.in_flight for r in usable) + 1) / len(usable))

        def room(r: Replica) -> bool:
            return r.in_flight < bound and (r.slots is None or r.in_flight < r.slots)

        home = self._homes.get(affinity)
        if home is not None and home in usable:
            self._homes.move_to_end(affinity)
            if room(home):
                return home
        ranked = sorted(usable, key=lambda r: hashlib.blake2b(affinity, key=r.hash_key, digest_size=8).digest(),
                        reverse=True)
        if home is not None and home in usable:  # too busy for now: the next in its order takes this one
            return next((r for r in ranked if room(r)), home)
        share = math.ceil((len(self._homes) + (home is None)) / len(usable))
        chosen = next((r for r in ranked if r.homes < share and room(r)), next((r for r in ranked if room(r)), ranked[0]))
        if home is not None:
            home.homes -= 1
        chosen.homes += 1
        self._homes[affinity] = chosen
        self._homes.move_to_end(affinity)
        while len(self._homes) > AFFINITY_KEYS:
            self._homes.popitem(last=False)[1].homes -= 1
        return chosen

    def unavailable(self) -> ServiceUnavailable:
        """The 503 for a request that found no replica to take it, saying why where the supervisor
        or the breakers said."""
        name = self.served.name
        tripped = [r.breaker for r in self.replicas if r.healthy and r.breaker.state != "closed"]
        if tripped:
            wait = min(b.retry_after() for b in tripped)
            return ServiceUnavailable(
                f"The model '{name}' failed repeatedly: the circuit breaker of every replica that passes its health "
                f"check is open, and lets a trial request through in {wait:.0f} s.", retry_after=max(1, math.ceil(wait)))
        if self.replicas and self.failed_count == len(self.replicas):
            reasons = "; ".join(f"replica #{r.status.replica}: {r.status.reason}" for r in self.replicas)
            return ServiceUnavailable(
                f"The model '{name}' is unavailable: every replica failed ({reasons}). It stays down until "
                "the appliance is restarted (or the model redeployed); the engine logs say more.", retry_after=60)
        exits = "; ".join(f"replica #{r.status.replica} is {r.status.state}, its last exit: {r.status.last_exit}"
                          for r in self.replicas if r.status and r.status.last_exit and r.status.state != READY)
        return ServiceUnavailable(
            f"The model '{name}' has no healthy replica right now{f' ({exits})' if exits else ''}; retry shortly.",
            retry_after=2)

    def readiness(self) -> dict:
        """The model's entry in /readyz."""
        out = {"replicas": len(self.replicas), "healthy": self.healthy_count, "failed": self.failed_count,
               "balance": self.served.balance, "engines": [r.readiness() for r in self.replicas]}
        if self.queue.capacity is not None:
            out |= {"slots": self.queue.capacity, "busy": self.queue.active, "queued": self.queue.depth}
        return out

    def apply_statuses(self, statuses: dict[tuple[str, str], ReplicaStatus]) -> None:
        """What the supervisor reported (services.engines.status.read_statuses), replica by replica."""
        for replica in self.replicas:
            status = statuses.get((self.served.name, replica.base_url))
            if status is not None and replica.status is not None and status.state != replica.status.state:
                log.info("%s is now %s%s", replica, status.state, f": {status.reason}" if status.reason else "")
            replica.status = status


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


async def template_caps(session: aiohttp.ClientSession, replica: Replica) -> dict | None:
    """What llama.cpp's server says its chat template supports (tools, system role, ...)."""
    try:
        async with session.get(replica.url("/props").with_path("/props"), headers=replica.headers,
                               timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as resp:
            if resp.status == 200:
                return (await resp.json()).get("chat_template_caps")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        pass
    return None


async def watch_health(session: aiohttp.ClientSession, pools: dict[str, ModelPool], interval_s: float, on_probed) -> None:
    """Probe every replica forever; call on_probed(pool) after each round of a model's probes."""
    while True:
        for pool in list(pools.values()):  # deployments come and go meanwhile
            outcomes = await asyncio.gather(*(probe(session, r) for r in pool.replicas))
            for replica, outcome in zip(pool.replicas, outcomes):
                replica.record_probe(outcome)
            if pool.served.engine == "llamacpp" and pool.native_tools is None and pool.healthy_count:
                caps = await template_caps(session, next(r for r in pool.replicas if r.healthy))
                if caps is not None:
                    pool.native_tools = bool(caps.get("supports_tools"))
            on_probed(pool)  # also publishes what failed requests marked down in between
        await asyncio.sleep(interval_s)
