"""The gateway, served by Granian's RSGI interface: the OpenAI routes (served by
`Gateway`, raw RSGI, the hot path) in front of a Litestar app for models, health,
readiness, metrics and /admin (over services/gateway/asgi_bridge.py). Errors become
OpenAI error objects in services/gateway/errors.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
from pathlib import Path
from time import perf_counter

import aiohttp
import msgspec
from granian.rsgi import HTTPProtocol, ProtocolClosed, ProtocolError, Scope
from litestar import Litestar, Request, Response, Router, get
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from appliance import __version__, deployments, policies, retention, routes
from appliance.audit import Actor, AuditQueue
from appliance.auth import Authenticator
from appliance.costs import Costs
from appliance.config import GatewayConfig
from appliance.db import open_db
from appliance.errors import (
    ApplianceError,
    ClientGone,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    PolicyViolation,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    StorageUnavailable,
)
from appliance.governance import Principal
from appliance.home import RUNTIME_ENV, ledger_dir, state_db_path, usage_journal_dir
from appliance.keys import KeyCache, UnknownKey
from appliance.limits import Governor, Ticket
from appliance.usage import UsageRecord, UsageRecorder
from services.gateway.prompting import PromptTemplates
from services.gateway.tool_loop import StepFailed, ToolLoop
from services.engines.status import read_statuses
from services.gateway import schemas
from services.gateway.adapters import Adapted, Outgoing, adapt
from services.gateway.admin_api import admin_router
from services.gateway.admin_auth import AuthController
from services.gateway.admission import affinity, authorise, budget_cap, masked_answer, refuse_unmaskable, worst_tokens
from services.gateway.answers import AnswerReader, collect
from services.gateway.asgi_bridge import AsgiBridge
from services.gateway.body_reads import drain, expire_reads, timed
from services.gateway.door import Door, open_door
from services.gateway.errors import EXCEPTION_HANDLERS, internal_error, respond_error
from services.gateway.inflight import InFlight, Ticker
from services.gateway.metrics import OPERATIONS, GatewayMetrics
from services.gateway.openapi import complete
from services.gateway.proxy import Call, Forwarder
from services.gateway.breakers import LEVELS
from services.gateway.cache import Cached, ResponseCache, cache_control, deterministic
from services.gateway.replicas import UPSTREAM_TIMEOUT, ModelPool, Replica, watch_health
from services.gateway.request_ids import new_request_id
from services.gateway.responses import ResponsesRequest, to_chat
from services.gateway.routing import RetryBudget, Route, route_readiness
from services.gateway.runtime import GatewayRuntime, ReplicaEndpoint, ServedModel, read_runtime
from services.gateway.schemas import Usage
from services.gateway.shadow import SKIPPED, answer_text, non_streamed, similarity
from services.gateway.stream_masking import masked_stream
from services.gateway.alerting import Alerter
from services.gateway import request_logs
from services.gateway.request_logs import Exchange
from services.gateway.state_metrics import StateCollector
from services.gateway.system import SystemState
from services.gateway.telemetry import Telemetry
from services.gateway.tracing import Tracing
from services.worker.queue import JobQueue

log = logging.getLogger("appliance.gateway")

REFRESH_S = 1.0
PRUNE_EVERY = 3600  # housekeeping ticks (about an hour) between retention's deletes
GC_YOUNG_THRESHOLD = 10_000  # CPython's default is 700
BUCKETS_RETRY_S = 5.0
# Idle engine connections are dropped before the engine drops them (llama.cpp's server and
# uvicorn, vLLM's, both close them after 5 s): a request never goes out on a closing one.
ENGINE_KEEPALIVE_S = 4.0
ADMIT_PAUSE_S, ADMIT_PAUSE_MAX_S = 0.005, 0.1  # waiting for a budget that requests in flight hold
UNKNOWN_MODEL = "-"  # metrics label for requests that never named a served model


class Gateway:
    """Everything a request needs, built once at start: keys, replicas, metrics, metering."""

    def __init__(self, runtime: GatewayRuntime):
        self.runtime = runtime
        self.config = runtime.gateway
        self.db_path = state_db_path(Path(runtime.home))
        self.keys = KeyCache()
        self.auth = Authenticator.from_config(self.keys, runtime.auth)
        self.metrics = GatewayMetrics()
        self.recorder = UsageRecorder(self.db_path, usage_journal_dir(Path(runtime.home)))
        self.costs = Costs.from_models(runtime.models, hardware_per_hour=runtime.costs.hardware_per_hour,
                                       currency=runtime.costs.currency)
        self.governor: Governor | None = None  # opened in start(): the ledger shared by the workers
        self.audit = AuditQueue()  # policy refusals and flags, written by a background task
        self.pools = {m.name: self._pool(m) for m in runtime.models}
        self.profile_models = frozenset(self.pools)
        self.deployed: dict[str, tuple] = {}  # deployment name -> what its pool was built from
        self.versions: dict[str, str] = {}  # registry version NAME@VERSION -> a deployment serving it
        self.route_specs = routes.effective(runtime.routes, {})  # the profile's, until the database is read
        self.routes = {name: Route(spec) for name, spec in self.route_specs.items()}
        self.store = runtime.storage.open() if runtime.storage else None
        self._list_models()
        self.budget = RetryBudget(self.config.retry)
        self.shadow_rows: list[tuple] = []  # shadow results waiting to be written (routes.SHADOW_COLUMNS)
        self._shadows: set[asyncio.Task] = set()  # shadow requests in flight
        self.forwarder: Forwarder | None = None
        self.ticker = Ticker()
        self._tasks: list[asyncio.Task] = []
        self._db = None
        self._db_lock = asyncio.Lock()  # one thread at a time on self._db
        self._keys_read_from = 0.0  # when the last reading of the keys began
        self.job_queue: JobQueue | None = None  # where /admin/jobs enqueues; the worker runs the jobs
        self.door: Door | None = None  # opened last in start(), once the gateway can serve
        self.system = SystemState(runtime)  # GET /admin/system
        self.state_metrics = StateCollector(self)  # GPUs, engines, jobs, backup and budgets, read at each scrape
        self.metrics.registry.register(self.state_metrics)
        self.alerter = Alerter(self)  # evaluates the alert rules, in the worker that holds its lock
        tracing = runtime.tracing if runtime.tracing.otlp_endpoint else None
        self.telemetry = Telemetry(self.db_path, tracing)  # exports spans and writes request logs, in a helper
        self.tracing = Tracing(tracing, self.telemetry) if tracing else None  # the spans of each request
        self.templates = PromptTemplates()  # rendered into chat requests that name one
        self.tool_loop = ToolLoop(Path(runtime.home), self.audit)  # runs the tools a chat request names

    def _pool(self, served: ServedModel) -> ModelPool:
        pool = ModelPool(served, self.config.breaker, self._on_breaker, self.config.queue, self._on_queue,
                         self.config.workers)
        for replica in pool.replicas:
            self._on_breaker(replica)
        self.metrics.child(self.metrics.replicas, served.name).set(len(pool.replicas))
        return pool

    def _on_breaker(self, replica: Replica) -> None:
        self.metrics.child(self.metrics.breaker_state, replica.model, replica.base_url).set(LEVELS[replica.breaker.state])

    def _on_queue(self, queue) -> None:
        self.metrics.child(self.metrics.queue_depth, queue.name).set(queue.depth)

    def pool_of(self, model: str) -> ModelPool | None:
        """A route's model: a served model, or the deployment serving a registry version NAME@VERSION."""
        pool = self.pools.get(model)
        if pool is None and "@" in model and (deployment := self.versions.get(model)) is not None:
            pool = self.pools.get(deployment)
        return pool

    def _list_models(self) -> None:
        names = [*self.pools, *(name for name in self.routes if name not in self.pools)]
        self.model_list = msgspec.json.encode({"object": "list", "data": [self.model_object(n) for n in names]})

    def model_object(self, name: str) -> dict | None:
        """A served model's or a route's entry in /v1/models; None if the name is neither."""
        pool = self.pools.get(name)
        if pool is None and name in self.routes:  # a route is as old as its oldest served target
            pool = min((p for t in self.routes[name].spec.targets if (p := self.pool_of(t.model))),
                       key=lambda p: p.served.created, default=None)
        elif pool is None:
            return None
        return {"id": name, "object": "model", "created": pool.served.created if pool else 0, "owned_by": "appliance"}

    async def start(self) -> None:
        self._db = await asyncio.to_thread(open_db, self.db_path)
        if replayed := await asyncio.to_thread(self.recorder.open):
            log.info("recorded %d usage rows that a stopped gateway process had journaled", replayed)
        self.governor = await asyncio.to_thread(Governor, ledger_dir(Path(self.runtime.home)), self.costs)
        if await asyncio.to_thread(self.governor.seed_from_usage, self._db):
            log.info("a new limits ledger: this period's spending was counted from the usage rows")
        self.job_queue = await asyncio.to_thread(JobQueue, Path(self.runtime.home))
        self._apply_state(*await asyncio.to_thread(self._read_state))
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), timeout=UPSTREAM_TIMEOUT,
        )
        self.forwarder = Forwarder(session, self.budget, self.metrics)
        self._tasks = [
            asyncio.create_task(watch_health(session, self.pools, self.config.health_interval_s, self._on_health)),
            asyncio.create_task(self._flush_usage()),
            asyncio.create_task(self._refresh()),
            asyncio.create_task(self._housekeeping()),
            asyncio.create_task(self.ticker.run()),
        ]
        if self.store is not None:
            self._tasks.append(asyncio.create_task(self._ensure_buckets()))
        self._tasks.append(asyncio.create_task(expire_reads(self.config.body_timeout_s)))
        self._tasks.append(asyncio.create_task(self.alerter.run()))
        self._tasks.append(asyncio.create_task(self.telemetry.run()))
        self.door = await open_door(self.config, Path(self.runtime.home))

    async def stop(self) -> None:
        if self.door is not None:
            self.door.close()  # no new connections while the rest stops
        for task in [*self._tasks, *self._shadows]:
            task.cancel()
        for task in [*self._tasks, *self._shadows]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.alerter.close()
        await self.recorder.flush()
        self.recorder.close()
        await self.audit.flush(self.db_path)
        await self.telemetry.close()  # the spans and request logs still waiting
        if self.governor is not None:
            self.governor.close()
        if self.forwarder:
            await self.forwarder.session.close()
        if self._db is not None:
            self._db.conn.close()

    def _on_health(self, pool: ModelPool) -> None:
        self.metrics.child(self.metrics.healthy_replicas, pool.served.name).set(pool.healthy_count)
        pool.queue.resize(pool.capacity())

    async def _flush_usage(self) -> None:
        while True:
            await asyncio.sleep(self.config.metering_flush_s)
            # Shielded: a flush stopped halfway (its rows written, its journal not yet
            # dropped) would be written again; stop()'s own flush waits for this one.
            await asyncio.shield(self.recorder.flush())
            self.metrics.usage_pending.set(self.recorder.pending)

    async def _refresh(self) -> None:
        """Keys, deployments and engine states follow the home within a second, off the request path."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                async with self._db_lock:
                    self._apply_state(*await asyncio.to_thread(self._read_state))
            except Exception:
                log.exception("refreshing keys, deployments and engine states failed; keeping the current ones")

    async def _housekeeping(self) -> None:
        """Once a second, off the request path: give back expired limit leases, release the
        reservations of dead gateway workers, write the queued audit rows, and delete what is past
        its retention (appliance/retention.py) now and then."""
        ticks = 0
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                self.governor.return_leases()  # a few microseconds: idle room goes back to the other workers
                await asyncio.to_thread(self.governor.sweep)
                await self.audit.flush(self.db_path)
                if self.shadow_rows:
                    rows, self.shadow_rows = self.shadow_rows, []
                    await asyncio.to_thread(self._write_shadow, rows)
                if ticks % PRUNE_EVERY == 0:
                    await asyncio.to_thread(self._prune)
            except Exception:
                log.exception("housekeeping (limits ledger, audit log) failed; retrying in a second")
            ticks += 1

    def _write_shadow(self, rows: list[tuple]) -> None:
        db = open_db(self.db_path, migrate=False)
        try:
            routes.record_shadow(db, rows)
        finally:
            db.conn.close()

    def _prune(self) -> None:
        db = open_db(self.db_path, migrate=False)
        try:
            deleted = retention.prune(db, self.runtime.retention, self.runtime.audit)
        finally:
            db.conn.close()
        if any(deleted.values()):
            log.info("retention deleted %s", ", ".join(f"{n} {kind} rows" for kind, n in deleted.items() if n))

    async def _ensure_buckets(self) -> None:
        """Create the buckets once the object store answers (a MinIO started beside the gateway may be late)."""
        while True:
            try:
                await asyncio.to_thread(self.store.ensure_buckets)
                return
            except StorageUnavailable as exc:
                log.warning("%s; retrying in %g s", exc.message, BUCKETS_RETRY_S)
            await asyncio.sleep(BUCKETS_RETRY_S)

    def _read_state(self) -> tuple[list[dict], dict, dict]:
        self._keys_read_from = perf_counter()
        self.auth.refresh(self._db)
        self.templates.refresh(self._db)
        self.tool_loop.refresh(self._db)
        return deployments.running(self._db), read_statuses(Path(self.runtime.home)), routes.stored(self._db)

    def _apply_state(self, rows: list[dict], statuses: dict, admin_routes: dict) -> None:
        """Deployments, then what each engine's supervisor reports (services/engines/status.py), then routes."""
        changed = self._apply_deployments(rows)
        for pool in self.pools.values():
            pool.apply_statuses(statuses)
            self.metrics.child(self.metrics.failed_replicas, pool.served.name).set(pool.failed_count)
        specs = routes.effective(self.runtime.routes, admin_routes)
        if specs != self.route_specs:
            self.route_specs, self.routes = specs, {name: Route(spec) for name, spec in specs.items()}
            log.info("serving routes: %s", ", ".join(sorted(specs)) or "none")
            changed = True
        if changed:
            self._list_models()

    def _apply_deployments(self, rows: list[dict]) -> bool:
        """Serve every running deployment, keeping pools (and their health) that did not change;
        whether any changed."""
        wanted = {r["name"]: r for r in rows if r["name"] not in self.profile_models}
        changed = False
        for name in [n for n in self.deployed if n not in wanted]:
            del self.deployed[name], self.pools[name]
            changed = True
        for name, row in wanted.items():
            source = (row["version_id"], tuple(e["base_url"] for e in row["endpoints"]))
            if self.deployed.get(name) == source:
                continue
            served = ServedModel(
                name=name, engine=row["engine"], replicas=[msgspec.convert(e, ReplicaEndpoint) for e in row["endpoints"]],
                request_timeout_s=self.config.request_timeout_s,
                created=int(row["created_at"]),
            )
            pool = self._pool(served)
            for replica in pool.replicas:
                replica.probe_ok = True  # the controller saw it healthy; the health watch takes over
            self.pools[name], self.deployed[name] = pool, source
            changed = True
        if changed:
            log.info("serving deployments: %s", ", ".join(sorted(self.deployed)) or "none")
            self.versions = {}
            for name, row in sorted(wanted.items()):
                self.versions.setdefault(f"{row['model']}@{row['version']}", name)
        return changed

    def unready_models(self) -> list[str]:
        return [name for name, pool in self.pools.items() if pool.healthy_count == 0]

    async def authenticate(self, authorization: str | None, *, monitoring: bool = False) -> Principal:
        """The caller (401 otherwise). A key the cache does not hold may have been made a moment
        ago, by this worker or another: unless a reading of the keys began since, they are read
        again first (one query while they are unchanged), so a new key or session works at once
        on every worker. Unknown keys that arrive together share one reading."""
        try:
            return self.auth.authenticate(authorization, monitoring=monitoring)
        except UnknownKey:
            missed_at = perf_counter()
            async with self._db_lock:
                if self._keys_read_from < missed_at:
                    self._keys_read_from = perf_counter()
                    try:
                        await asyncio.to_thread(self.auth.keys.refresh, self._db)
                    except Exception:  # the answer is the cache's: a 401
                        log.exception("reading the keys for a key not in the cache failed")
        return self.auth.authenticate(authorization, monitoring=monitoring)

    # --- the OpenAI routes: raw RSGI, the hot path -----------------------------

    async def serve(self, scope: Scope, proto: HTTPProtocol, endpoint: str, schema: type[msgspec.Struct]) -> None:
        """Answer one OpenAI POST. Errors before the answer starts are raised to the
        app's exception handlers; a client that goes away cancels the engine request."""
        call = Call(new_request_id(), None, endpoint, perf_counter())
        try:
            if scope.method != "POST":
                raise MethodNotAllowed(f"Use POST for /v1/{endpoint}.")
            headers = scope.headers
            if self.tracing is not None:
                call.trace = self.tracing.begin(endpoint, headers.get("traceparent"))
            principal = call.principal = await self.authenticate(headers.get("authorization"))
            call.key_id = principal.key_id
            if call.trace is not None:
                call.trace.mark("authenticate")
            body = await read_body(proto, headers.get("content-length"), self.config.max_body_bytes)
            if endpoint == "chat/completions" and b'"template"' in body:  # maybe a prompt template's name
                body, call.template = self.templates.apply(body)
            if endpoint == "chat/completions" and b'"server_tools"' in body:
                # Tools the gateway runs: each step of the loop is a request of its own, metered as such.
                try:
                    answer = await self.tool_loop.serve(call.request_id, _actor(call, principal),
                                                        headers.get("authorization"), body)
                except StepFailed as failed:  # a step's own error answer, as it came
                    proto.response_bytes(failed.status, self._headers(call, JSON), failed.body)
                    return
                proto.response_bytes(200, self._headers(call, JSON), answer)
                return
            parsed = schemas.decode(body, schema)
            call.model = parsed.model  # metered under the name asked for until a served model takes it
            call.stream = getattr(parsed, "stream", False)
            authorise(principal, parsed.model)
            plan = self._plan(call, principal, parsed.model, endpoint)
            if call.trace is not None:
                call.trace.mark("route")
            pool = plan[0]
            call.model = pool.served.name
            refuse_unmaskable(principal.policy, parsed)
            call.ticket = await self._admit(call, principal, endpoint, parsed, len(body), plan)
            if principal.policy.inspects and not policies.untouched(principal.policy, endpoint, parsed):
                body, parsed = self._apply_policy(call, principal, endpoint, body, parsed, schema)
            if principal.policy.log_requests:
                call.log = Exchange(body)
            prepared = {pool: self._adapt(endpoint, body, parsed, pool, principal)}
            if pool.served.balance == "prefix_affinity" or (
                    call.route is not None and any(option.served.balance == "prefix_affinity" for option in plan)):
                call.affinity = affinity(headers, body)
            hit = self._look_up(call, pool, headers, endpoint, parsed, body) if pool.cache is not None else None
            if call.trace is not None:
                call.trace.mark("policy")
        except ApplianceError as error:
            self._fail(call, error)
            raise
        except ProtocolClosed:  # the client left while sending its request
            error = ClientGone("The client closed the connection while sending its request.")
            self._fail(call, error)
            raise error from None
        except Exception as exc:
            error = internal_error(exc, call.request_id)
            self._fail(call, error)
            raise error from exc
        if hit is not None:
            await self._replay(call, proto, hit)
            return
        in_flight = self.metrics.child(self.metrics.in_flight, call.model)
        in_flight.inc()
        flight = self.ticker.track(call, proto)

        def prepare(option: ModelPool) -> tuple[str, bytes, bool]:
            """The request for a route's next model (one that cannot serve it raises InvalidRequest)."""
            if option not in prepared:
                prepared[option] = self._adapt(endpoint, body, parsed, option, call.principal)
            path, adapted, _ = prepared[option]
            return path, adapted.body, call.stream or adapted.collect

        try:
            pool, response = await self.forwarder.open(call, plan, prepare)
            if call.trace is not None:
                call.trace.mark("engine")
            _, adapted, reader = prepared[pool]
            if call.route is not None:
                call.model = pool.served.name
                self.metrics.child(self.metrics.route_requests, call.route, call.model,
                                   "no" if pool is plan[0] else "yes").inc()
            keep = pool.cache if call.cache_key is not None and pool is plan[0] else None
            shadow = self._shadow_of(call, endpoint) if call.route is not None else None
            if call.stream:
                kept = [] if keep is not None or shadow is not None or call.log is not None else None  # as sent
                if call.log is not None:
                    call.log.pieces = kept
                await self._answer_stream(call, pool, response, adapted, reader, proto, flight, kept)
                answer = b"".join(kept) if kept is not None else None
            else:
                if adapted.collect:
                    payload = await self._collect(call, pool, response)
                else:
                    payload = await self.forwarder.complete(call, pool, response)
                if reader is not None:
                    payload = reader.complete(payload)
                if call.principal.policy.pii_responses:
                    payload = masked_answer(call.principal.policy, payload)
                flight.disarm()
                call.answer_started = True
                if call.log is not None:
                    call.log.answer = payload
                self.finish(call)  # journaled before the client has the answer
                proto.response_bytes(200, self._headers(call, JSON), payload)
                answer = payload
            if answer is not None and call.status == 200:
                try:
                    if keep is not None:
                        self._keep(keep, call, answer)
                    if shadow is not None:
                        self._mirror(call, shadow, endpoint, body, parsed, answer)
                except Exception:  # the client has its answer: what fails here is only logged
                    log.exception("keeping or shadowing the answer of %s failed", call.request_id)
        except ApplianceError as error:  # raised before the answer started
            call.status, call.error_type = error.status, error.type
            error.request_id = call.request_id
            raise
        except asyncio.CancelledError:
            if not flight.client_gone:
                call.status, call.error_type = 503, "shutdown"
                raise  # the server is shutting down
            asyncio.current_task().uncancel()
            call.status, call.error_type = ClientGone.status, ClientGone.type
        except ProtocolClosed:  # the client left mid-stream, before the ticker saw it
            call.status, call.error_type = ClientGone.status, ClientGone.type
        except Exception as exc:
            call.status, call.error_type = 500, "internal_error"
            if call.answer_started:
                raise
            raise internal_error(exc, call.request_id) from exc
        finally:
            self.ticker.untrack(flight)
            in_flight.dec()
            if call.replica is not None:
                call.replica.in_flight -= 1
            if call.slot is not None:
                call.slot.release()
            self.finish(call)

    def _plan(self, call: Call, principal: Principal, name: str, endpoint: str) -> list[ModelPool]:
        """The models that may answer a request for `name`, in the order to try them: the model
        itself, or a route's target drawn by weight, its other targets and its fallbacks
        (services/gateway/routing.py); remote upstreams are left out for a caller whose policy
        keeps requests on the appliance, and a route's models without embeddings from an
        embeddings request."""
        route = self.routes.get(name)
        if route is None:
            pool = self.pools.get(name)
            if pool is None:
                raise ModelNotFound(name)
            plan = [pool]
        else:
            call.route, call.shadow = name, route.spec.shadow
            plan = [pool for model in route.choose() if (pool := self.pool_of(model)) is not None]
            if endpoint == "embeddings" and plan:
                plan = [pool for pool in plan if pool.served.embeddings] or plan[:1]  # else: 400 naming the model
        if principal.policy.no_external:
            local = [pool for pool in plan if pool.served.engine != "remote"]
            if plan and not local:
                raise ModelNotAllowed(f"The model '{name}' is served only by remote upstreams, and the policy of this "
                                      "key or its team keeps requests on the appliance (no external transfer).",
                                      param="model", code="external_transfer_not_allowed")
            plan = local
        if not plan:
            models = [t.model for t in route.spec.targets] + route.spec.fallbacks
            raise ServiceUnavailable(f"No model of the route '{name}' is served right now (it names "
                                     f"{', '.join(models)}).", retry_after=5)
        return plan

    def _adapt(self, endpoint: str, body: bytes, parsed, pool: ModelPool,
               principal: Principal) -> tuple[str, Adapted, AnswerReader | None]:
        """The engine path and request (services/gateway/adapters.py), and who reads its answer
        back when the engine's own answer is not what the client asked for."""
        if endpoint == "embeddings" and not pool.served.embeddings:
            raise InvalidRequest(f"The model '{pool.served.name}' does not serve embeddings.", param="model")
        cap = budget_cap(principal, endpoint, parsed, pool.served)
        if endpoint == "responses":  # answered by the engine's chat completions
            responses, outgoing = parsed, Outgoing(data=to_chat(parsed))
            parsed, path = msgspec.convert(outgoing.data, schemas.ChatCompletionRequest), "/chat/completions"
        else:
            responses, outgoing, path = None, Outgoing(body), "/" + endpoint
        adapted = adapt(outgoing, parsed, pool, self.config.max_n, cap)
        reader = AnswerReader(adapted.tools, responses) if adapted.tools or responses else None
        return path, adapted, reader

    async def _collect(self, call: Call, pool: ModelPool, response: aiohttp.ClientResponse) -> bytes:
        """A whole answer, asked of the engine as a stream (services/gateway/adapters.py says when)."""
        await self.forwarder.check_stream(call, pool, response)
        events = self.forwarder.relay(call, pool, response, hide_usage=True)
        try:
            return await collect(events, call)
        finally:
            await close_answer(response, events)

    async def _answer_stream(self, call: Call, pool: ModelPool, response: aiohttp.ClientResponse, adapted: Adapted,
                             reader: AnswerReader | None, proto: HTTPProtocol, flight: InFlight,
                             kept: list[bytes] | None) -> None:
        """Relay the stream; `kept`, where given, gets every piece sent."""
        await self.forwarder.check_stream(call, pool, response)
        relayed = self.forwarder.relay(call, pool, response, adapted.hide_usage)
        policy = call.principal.policy  # pii_responses: masked before a reader makes Responses events of it
        masked = masked_stream(policy, relayed) if policy.pii_responses else relayed
        events = reader.stream(masked) if reader is not None else masked
        try:
            call.answer_started = True
            transport = proto.response_stream(200, self._headers(call, SSE))
            async for piece in events:
                if kept is not None:
                    kept.append(piece)
                if call.answered:  # this piece ends the stream; the client may hang up after it
                    flight.disarm()
                    self.finish(call)  # journaled before the client has the answer's end
                await transport.send_bytes(piece)
            flight.disarm()
        finally:
            await close_answer(response, events, masked, relayed)  # now, not when collected: it meters a stream cut short

    def _look_up(self, call: Call, pool: ModelPool, headers, endpoint: str, parsed, body: bytes) -> Cached | None:
        """A cached answer to a deterministic request to a model with a cache (services/gateway/cache.py)."""
        if not deterministic(endpoint, parsed):
            return None
        call.cache = cache_control(headers.get("cache-control"))
        hit = None
        if call.cache != "bypass":
            call.cache_key = pool.cache.key(call.principal, pool.served.name, endpoint, body,
                                            budget_cap(call.principal, endpoint, parsed, pool.served))
            if call.cache == "lookup":
                hit = pool.cache.get(call.cache_key)
                call.cache = "hit" if hit is not None else "miss"
        self.metrics.child(self.metrics.cache_requests, pool.served.name, call.cache).inc()
        return hit

    def _keep(self, cache: ResponseCache, call: Call, answer: bytes) -> None:
        cache.put(call.cache_key, answer, call.usage)
        self.metrics.child(self.metrics.cache_bytes, call.model).set(cache.size_bytes)

    def _shadow_of(self, call: Call, endpoint: str) -> ModelPool | None:
        """The model a routed request is copied to, if this one is drawn (services/gateway/shadow.py)."""
        spec = call.shadow
        if spec is None or endpoint not in SHADOWED or random.random() * 100 >= spec.percent:
            return None
        pool = self.pool_of(spec.model)
        queue = pool.queue if pool is not None else None
        if (pool is None or (call.principal.policy.no_external and pool.served.engine == "remote")
                or (queue.capacity is not None and queue.active >= queue.capacity)):
            self.metrics.child(self.metrics.shadow_requests, call.route, spec.model, SKIPPED).inc()
            return None
        return pool

    def _mirror(self, call: Call, pool: ModelPool, endpoint: str, body: bytes, parsed, answer: bytes) -> None:
        primary = (answer_text(answer, call.stream), (perf_counter() - call.started) * 1000,
                   call.usage.total_tokens if call.usage else None)
        task = asyncio.create_task(self._shadow(call, pool, endpoint, non_streamed(body), type(parsed), *primary))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, call: Call, pool: ModelPool, endpoint: str, body: bytes, schema, primary_text: str,
                      primary_ms: float, primary_tokens: int | None) -> None:
        """Send the copy and record both answers; nothing of it reaches the client or its budget."""
        copy = Call(new_request_id(), call.key_id, endpoint, perf_counter())
        copy.principal, copy.model, copy.route = call.principal, pool.served.name, call.route
        status, error, text = 200, None, ""
        try:
            async with asyncio.timeout(pool.timeout_s):
                path, adapted, reader = self._adapt(endpoint, body, schemas.decode(body, schema), pool, copy.principal)
                _, response = await self.forwarder.open(copy, [pool], lambda _: (path, adapted.body, adapted.collect),
                                                        spare=True)
                if adapted.collect:
                    payload = await self._collect(copy, pool, response)
                else:
                    payload = await self.forwarder.complete(copy, pool, response)
                text = answer_text(reader.complete(payload) if reader is not None else payload, False)
        except Overloaded:  # its engines got busy meanwhile: a shadow never waits for a slot
            self.metrics.child(self.metrics.shadow_requests, call.route, pool.served.name, SKIPPED).inc()
            return
        except ApplianceError as exc:
            status, error = exc.status, exc.message
        except TimeoutError:
            status, error = 504, f"no answer within {pool.timeout_s:g} s"
        except Exception as exc:
            log.exception("shadow request %s for %s failed", copy.request_id, call.request_id)
            status, error = 500, type(exc).__name__
        finally:
            if copy.replica is not None:
                copy.replica.in_flight -= 1
            if copy.slot is not None:
                copy.slot.release()
        self.shadow_rows.append((
            time.time(), call.route, call.request_id, call.model, pool.served.name, primary_ms,
            (perf_counter() - copy.started) * 1000, primary_tokens, copy.usage.total_tokens if copy.usage else None,
            status, error, similarity(primary_text, text) if status == 200 else None))
        self.metrics.child(self.metrics.shadow_requests, call.route, pool.served.name,
                           "ok" if status == 200 else "error").inc()

    async def _replay(self, call: Call, proto: HTTPProtocol, hit: Cached) -> None:
        """Answer from the cache: the same bytes the first caller got, a stream as a stream."""
        call.usage, call.answer_started, call.answered = hit.usage, True, True
        if call.log is not None:
            call.log.answer = hit.body
        self.finish(call)
        with contextlib.suppress(ProtocolClosed):
            if call.stream:
                await proto.response_stream(200, self._headers(call, SSE)).send_bytes(hit.body)
            else:
                proto.response_bytes(200, self._headers(call, JSON), hit.body)

    async def _admit(self, call: Call, principal: Principal, endpoint: str, parsed, size: int,
                     plan: list[ModelPool]) -> Ticket:
        """Reserve the request's worst case, on whichever model of its plan answers, against its key's
        and team's limits and budgets. Room held only by requests in flight (they settle to their real
        usage, usually far less) or leased by other workers (given back within a second or so) is
        waited for, up to the request timeout; anything else refuses at once."""
        prompt, completion = worst_tokens(endpoint, parsed, size, plan[0].served)
        worst_cost = self.costs.worst_cost(plan[0].served.name, prompt, completion)
        for other in plan[1:]:  # a route's other models, should the first fail
            tokens = worst_tokens(endpoint, parsed, size, other.served)
            worst_cost = max(worst_cost, self.costs.worst_cost(other.served.name, *tokens))
            completion = max(completion, tokens[1])
        deadline = perf_counter() + self.config.request_timeout_s
        pause = ADMIT_PAUSE_S
        while True:
            try:
                return self.governor.admit(principal, call.model, worst_tokens=prompt + completion,
                                           worst_cost=worst_cost)
            except (QuotaExceeded, RateLimited) as exc:
                if not exc.held or perf_counter() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, ADMIT_PAUSE_MAX_S)

    def _apply_policy(self, call: Call, principal: Principal, endpoint: str, body: bytes, parsed, schema):
        """The key's and team's policy on the request (appliance/policies.py): refused, masked or
        flagged before it leaves the gateway. Refusals and flags go to the audit log; values never do."""
        try:
            inspection = policies.inspect(principal.policy, endpoint, msgspec.json.decode(body))
        except PolicyViolation as exc:
            self.audit.add(_actor(call, principal), "policy.block", f"model/{call.model}",
                           outcome=f"refused: {exc.rule}",
                           detail={"rule": exc.rule, "param": exc.param, "endpoint": endpoint})
            raise
        for finding in inspection.findings:
            self.audit.add(_actor(call, principal), "policy.flag", f"model/{call.model}",
                           outcome=f"flagged: {finding.rule}",
                           detail={"rule": finding.rule, "param": finding.param, "entry": finding.detail,
                                   "endpoint": endpoint})
        if inspection.body is None:
            return body, parsed
        for kind, count in inspection.masked.items():
            self.metrics.child(self.metrics.pii_masked, kind).inc(count)
        body = msgspec.json.encode(inspection.body)
        return body, schemas.decode(body, schema)

    @staticmethod
    def _headers(call: Call, base: list) -> list:
        headers = [*base, ("x-request-id", call.request_id)]
        if call.route is not None:
            headers.append(("x-appliance-model", call.model))  # which of the route's models answered
        if call.cache is not None:
            headers.append(("x-appliance-cache", call.cache))
        if call.ticket is not None and call.ticket.headers:
            headers += call.ticket.headers
        return headers

    def _fail(self, call: Call, error: ApplianceError) -> None:
        call.status, call.error_type = error.status, error.type
        error.request_id = call.request_id
        if isinstance(error, GOVERNANCE_REFUSALS):
            self.metrics.child(self.metrics.policy_refusals, getattr(error, "rule", error.code)).inc()
        self.finish(call)

    def finish(self, call: Call) -> None:
        """Metrics and the usage row of one call, once; cheap and synchronous (one
        append to the usage journal, appliance/usage.py)."""
        if call.finished:
            return
        call.finished = True
        elapsed = perf_counter() - call.started
        if call.trace is not None:
            call.trace.end(call)
        if call.log is not None:
            self.telemetry.add_log(request_logs.record(call, elapsed * 1000))
        m = self.metrics
        model = call.model if call.model in self.pools else UNKNOWN_MODEL
        operation = OPERATIONS.get(call.endpoint, call.endpoint)
        m.child(m.requests, model, call.endpoint, str(call.status)).inc()
        m.child(m.latency, model, operation).observe(elapsed)
        if call.error_type:
            m.child(m.errors, model, call.endpoint, call.error_type).inc()
        if call.ttft is not None:
            m.child(m.ttft, model, operation).observe(call.ttft)
        usage, saved = call.usage, None
        if call.cache == "hit":  # nothing processed: what the answer had cost is saved
            saved, usage = usage.total_tokens if usage else 0, NO_USAGE
            m.child(m.cache_saved_tokens, model).inc(saved)
        if usage is not None:
            m.child(m.tokens, model, "prompt").inc(usage.prompt_tokens)
            m.child(m.tokens, model, "completion").inc(usage.completion_tokens)
            if call.ttft is not None and usage.completion_tokens > 1 and call.status == 200:
                m.child(m.tpot, model, operation).observe((elapsed - call.ttft) / (usage.completion_tokens - 1))
        principal = call.principal
        if principal is None:
            return  # unauthenticated: counted in metrics, not metered against anyone
        cost = self.costs.cost(call.model, usage.prompt_tokens, usage.completion_tokens) if usage and call.model else None
        if call.ticket is not None:
            self.governor.settle(call.ticket, tokens=usage.total_tokens if usage else 0, cost=cost or 0.0)
        if usage and call.status == 200 and saved is None and self.costs.measured(call.model):
            self.costs.throughput.record(call.model, usage.total_tokens, elapsed, time.time())
        self.recorder.record(
            UsageRecord(
                ts=time.time(),
                request_id=call.request_id,
                key_id=call.key_id,
                model=call.model or "",
                endpoint=call.endpoint,
                stream=call.stream,
                status=call.status,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                total_tokens=usage.total_tokens if usage else None,
                latency_ms=elapsed * 1000,
                ttft_ms=call.ttft * 1000 if call.ttft is not None else None,
                user_id=principal.user_id,
                team_id=principal.team_id,
                cost=cost,
                cached=saved is not None,
                saved_tokens=saved,
                template=call.template,
                route=call.route,
            )
        )


def _actor(call: Call, principal: Principal) -> Actor:
    """Who a policy refusal or flag is audited as: made only then, not on every request."""
    return Actor(principal.key_id, principal.name, principal.role, call.request_id, principal.user_id,
                 principal.team_id)


SHADOWED = ("chat/completions", "completions")  # the endpoints whose answers a shadow copy is compared on
NO_USAGE = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
GOVERNANCE_REFUSALS = (RateLimited, QuotaExceeded, PolicyViolation, ModelNotAllowed)
JSON = [("content-type", "application/json")]
SSE = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


async def read_body(proto: HTTPProtocol, content_length: str | None, limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes before reading it all, and a
    body that does not arrive within gateway.body_timeout_s (services/gateway/body_reads.py)."""
    if content_length is not None and content_length.isdigit():
        expected = int(content_length)
        if expected > limit:
            raise PayloadTooLarge(body_limit_message(limit))
        body = await timed(proto())
        if len(body) < expected:  # RSGI ends a body cut short without saying so
            raise ClientGone("The client closed the connection while sending its request.")
        return body
    chunks, size = [], 0  # chunked: no length announced
    stream = proto.__aiter__()
    while True:
        try:
            chunk = await timed(stream.__anext__())
        except StopAsyncIteration:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(body_limit_message(limit))
        chunks.append(chunk)
    return b"".join(chunks)


async def close_answer(response: aiohttp.ClientResponse, *streams) -> None:
    """Close an answer's generators in order, then the engine connection (idempotent), each
    whatever the one before did: a relay closed now meters a stream cut short."""
    async with contextlib.AsyncExitStack() as closing:
        closing.callback(response.close)
        for stream in reversed(streams):
            closing.push_async_callback(stream.aclose)


def body_limit_message(limit: int) -> str:
    return f"The request body is larger than the gateway's limit of {limit} bytes (gateway.max_body_bytes)."


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


@get("/v1/models")
async def list_models(request: Request) -> Response:
    gateway = gateway_of(request)
    await gateway.authenticate(request.headers.get("authorization"))
    return Response(gateway.model_list, media_type="application/json")


@get("/v1/models/{model:str}")
async def get_model(request: Request, model: str) -> Response:
    gateway = gateway_of(request)
    await gateway.authenticate(request.headers.get("authorization"))
    entry = gateway.model_object(model)
    if entry is None:
        raise ModelNotFound(model)
    return Response(msgspec.json.encode(entry), media_type="application/json")


async def monitoring_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guards /metrics and /schema: with gateway.metrics_require_key, a key of any role (metrics or above)."""
    gateway = gateway_of(connection)
    if gateway.config.metrics_require_key:
        await gateway.authenticate(connection.headers.get("authorization"), monitoring=True)


@get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@get("/readyz")
async def readyz(request: Request) -> Response:
    """Ready when every model has a healthy replica; the details need a key under gateway.metrics_require_key."""
    gateway = gateway_of(request)
    unready = gateway.unready_models()
    body, status = {"status": "ready" if not unready else "not ready"}, 200 if not unready else 503
    if gateway.config.metrics_require_key:
        authorization = request.headers.get("authorization")
        if not authorization:  # a load balancer's probe
            return Response(body, status_code=status)
        await gateway.authenticate(authorization, monitoring=True)
    body["models"] = {name: pool.readiness() for name, pool in gateway.pools.items()}
    if gateway.routes:
        body["routes"] = {name: route_readiness(route, gateway.pool_of) for name, route in gateway.routes.items()}
    if unready:
        body["waiting_for"] = unready
    return Response(body, status_code=status)


@get("/metrics", guards=[monitoring_key])
async def metrics(request: Request) -> Response:
    gateway = gateway_of(request)
    await gateway.state_metrics.refresh()
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# The OpenAI POST routes: the hot path, answered before Litestar's router.
OPENAI_POSTS = {
    "/v1/chat/completions": ("chat/completions", schemas.ChatCompletionRequest),
    "/v1/completions": ("completions", schemas.CompletionRequest),
    "/v1/embeddings": ("embeddings", schemas.EmbeddingRequest),
    "/v1/responses": ("responses", ResponsesRequest),
}


class GatewayApp:
    """What Granian serves (RSGI): the OpenAI POST routes go straight to the Gateway, with
    no router or middleware on the hot path; everything else is the Litestar app."""

    def __init__(self, gateway: Gateway, litestar: Litestar):
        self.gateway = gateway
        self.litestar = AsgiBridge(litestar, gateway.config.max_body_bytes)

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.gateway.start())
        tune_gc()

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.gateway.stop())

    async def __rsgi__(self, scope: Scope, proto: HTTPProtocol) -> None:
        route = OPENAI_POSTS.get(scope.path)
        if route is None:
            await self.litestar(scope, proto)
            return
        try:
            await self.gateway.serve(scope, proto, *route)
        except ApplianceError as exc:  # raised only before the answer started
            with contextlib.suppress(ProtocolError):  # the body was read already
                await drain(proto.__aiter__(), self.gateway.config.max_body_bytes)
            respond_error(proto, exc)
        # Anything else was raised after the answer started: Granian logs it and drops the connection.


def tune_gc() -> None:
    """Keep the garbage collector off the hot path (docs/benchmarks.md has the numbers).

    Under load, full collections walked the whole startup heap (about 60 ms each, twice a
    second at concurrency 64, stalling every request in flight) and the youngest generation
    ran hundreds of times a second. The objects alive after startup are frozen out of
    collection, and the youngest generation waits for GC_YOUNG_THRESHOLD net allocations.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def create_app(runtime: GatewayRuntime | None = None) -> GatewayApp:
    """RSGI app factory; Granian calls it with no argument and the runtime file named by the env."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if runtime is None:
        runtime = read_runtime(Path(os.environ[RUNTIME_ENV]))
    gateway = Gateway(runtime)
    litestar = litestar_app(runtime.gateway)
    litestar.state.gateway = gateway
    return GatewayApp(gateway, litestar)


def litestar_app(config: GatewayConfig) -> Litestar:
    """Everything but the OpenAI POSTs; its OpenAPI document describes those too."""
    litestar = Litestar(
        route_handlers=[list_models, get_model, healthz, readyz, metrics, admin_router(), AuthController],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(title="LLM appliance", version=__version__,
                                     openapi_router=Router("/schema", route_handlers=[], guards=[monitoring_key],
                                                          include_in_schema=False)),
    )
    complete(openapi_document(litestar), {path: schema for path, (_, schema) in OPENAI_POSTS.items()}, litestar.routes)
    return litestar


def openapi_document(litestar: Litestar) -> dict:
    """The document /schema serves, built once and cached by Litestar: `complete` edits that one."""
    return litestar.plugins.get(OpenAPIPlugin).provide_openapi_schema()
