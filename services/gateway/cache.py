"""The response cache: exact answers to deterministic requests, replayed without the engine.

A model with `cache` in its profile keeps, in each gateway worker's memory, the answers to
requests that ask for a deterministic one: temperature 0 or a fixed seed (chat and
completions), and every embedding. The key is the client's request (after the policy
masked it), its fields in any order, with the completion cap a budgeted caller's request is
sent with, the model that answers it and the caller's team (a key without a team: the key;
a team-less identity-provider user: the user), unless the cache is `shared`; a caller whose
policy masks answers (pii_responses) has its own entries. What is stored is the answer as
the client got it: a stream is replayed as the same stream. Entries expire after ttl_s,
and the least recently used go first past max_mb.

`Cache-Control: no-cache` on a request skips the lookup (the fresh answer replaces the
entry); `no-store` skips the cache altogether. Answers carry `x-appliance-cache`: hit,
miss, refresh or bypass. A hit is metered as such (appliance/usage.py `cached`): no tokens
processed or billed, its saved tokens counted.
"""

from __future__ import annotations

import hashlib

import cachetools
import msgspec

from appliance.config import CacheConfig
from appliance.governance import Principal
from services.gateway.schemas import Usage

MAX_ENTRY_BYTES = 4 * 2**20  # a larger answer is not kept
ENTRY_OVERHEAD = 256  # bytes counted per entry beyond its answer


class Cached(msgspec.Struct, frozen=True):
    body: bytes  # the answer's bytes: JSON, or the stream's events
    usage: Usage | None


class ResponseCache:
    def __init__(self, config: CacheConfig):
        self.config = config
        self.lookups = self.hits = 0  # this worker's, since it started
        self.entries: cachetools.TTLCache = cachetools.TTLCache(
            maxsize=config.max_mb * 2**20, ttl=config.ttl_s, getsizeof=lambda e: len(e.body) + ENTRY_OVERHEAD)

    def key(self, principal: Principal, model: str, endpoint: str, body: bytes, cap: int | None = None) -> bytes:
        """`cap`: the completion cap a budgeted caller's request is sent with (admission.budget_cap)."""
        scope = "*" if self.config.shared else principal.team_id or (
            f"key:{principal.key_id}" if principal.key_id else f"user:{principal.user_id or principal.name}")
        masks = msgspec.json.encode(principal.policy) if principal.policy.pii_responses else b""
        request = msgspec.json.encode(msgspec.json.decode(body), order="sorted")
        parts = (scope.encode(), model.encode(), endpoint.encode(), masks, str(cap).encode(), request)
        return hashlib.blake2b(b"\0".join(parts), digest_size=20).digest()

    def get(self, key: bytes) -> Cached | None:
        hit = self.entries.get(key)
        self.lookups += 1
        self.hits += hit is not None
        return hit

    def put(self, key: bytes, body: bytes, usage: Usage | None) -> None:
        if len(body) <= MAX_ENTRY_BYTES:
            self.entries[key] = Cached(body, usage)

    @property
    def size_bytes(self) -> int:
        return int(self.entries.currsize)

    def state(self) -> dict:
        """What /admin/serving shows of it."""
        return {"entries": len(self.entries), "bytes": self.size_bytes, "max_bytes": int(self.entries.maxsize),
                "ttl_s": self.config.ttl_s, "shared": self.config.shared, "lookups": self.lookups, "hits": self.hits,
                "hit_rate": round(self.hits / self.lookups, 4) if self.lookups else None}


def deterministic(endpoint: str, parsed) -> bool:
    """Whether the request asks for an answer that does not change from one call to the next."""
    if endpoint == "embeddings":
        return True
    return endpoint != "responses" and (parsed.temperature == 0 or parsed.seed is not None)


def cache_control(value: str | None) -> str:
    """'lookup' (answer from the cache, else keep the answer), 'refresh' (no-cache: keep the fresh
    answer only) or 'bypass' (no-store)."""
    if not value:
        return "lookup"
    value = value.lower()
    return "bypass" if "no-store" in value else "refresh" if "no-cache" in value else "lookup"
