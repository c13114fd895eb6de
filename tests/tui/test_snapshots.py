"""SVG snapshots of the console's main screens (pytest-textual-snapshot), drawn from a real
gateway of their own with known contents.

What changes from run to run is pinned in the answers before the console draws them, and
nothing else is touched: ids and key prefixes become stable stand-ins, times become five
minutes before a fixed instant the console's clock is stopped at (in UTC), the uptime an hour, latencies 250 ms, request ids a count and the gateway's
address gateway.lan:8080 (the test's port is random). The chat requests that usage shows ask
for a few tokens of a long answer, so their token counts do not vary. Accept a changed screen with `pytest tests/tui/test_snapshots.py
--snapshot-update`, after looking at it (tests/tui/__snapshots__)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, default_gguf, start_stack, write_profile
from tests.gateway.registry_stores import path_without_minio
from tests.tui.conftest import cells, laid_out, make_key, until
from tui import format as fmt
from tui.app import ConsoleApp
from tui.client import Api

pytestmark = pytest.mark.stack

SIZE = (150, 40)
NOW = datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc).timestamp()  # the console's clock, stopped
AGO_S = 300
TIMES = {"created_at", "updated_at", "ts", "started_at", "finished_at", "revoked_at", "disabled_at", "last_login_at",
         "last_ts"}
LATENCIES = {"avg_latency_ms", "avg_ttft_ms"}
IDS = re.compile(r"\b(key|usr|team|user|job|sess)_[0-9a-f]{6,}\b")
PREFIX = re.compile(r"\bsk-ap-[A-Za-z0-9_-]{6}")


class PinnedApi(Api):
    """The real client; its answers with the volatile values pinned (see the module's doc)."""

    def __init__(self, url: str, key: str, ids: dict[str, str]):
        super().__init__(url, key)
        self.url = "http://gateway.lan:8080"  # shown in the context line; requests still go to the real URL
        self.ids = ids
        self.request_ids: dict[str, str] = {}

    def _pin(self, value, name: str = ""):
        if isinstance(value, dict):
            return {k: self._pin(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self._pin(v, name) for v in value]
        if name in TIMES and isinstance(value, (int, float)):
            return NOW - AGO_S
        if name == "uptime_s":
            return 3600.0
        if name in LATENCIES and value is not None:
            return 250.0
        if name == "request_id" and value:
            return self.request_ids.setdefault(value, f"req-{len(self.request_ids) + 1:04d}")
        if isinstance(value, str):
            value = IDS.sub(lambda m: self.ids.get(m.group(0), f"{m.group(1)}_unknown"), value)
            return PREFIX.sub("sk-ap-XXXXXX", value)
        return value

    async def request(self, method: str, path: str, **kwargs):
        return self._pin(await super().request(method, path, **kwargs))


@pytest.fixture(scope="module")
def snapshot_stack(tmp_path_factory):
    """A fresh gateway serving the default model, with a few keys, a user and a team."""
    tmp = tmp_path_factory.mktemp("snapshots")
    running = start_stack(tmp, write_profile(tmp / "profile.yaml", None), env={"PATH": path_without_minio()})
    admin = httpx.Client(base_url=running.root, headers={"Authorization": f"Bearer {running.admin_key}"})
    admin.post("/admin/teams", json={"name": "research", "budget_tokens": 2_000_000, "period": "month"}).raise_for_status()
    admin.post("/admin/users", json={"name": "alice", "role": "developer", "password": "correct horse battery"}
               ).raise_for_status()
    admin.post("/admin/teams/research/members", json={"user": "alice"}).raise_for_status()
    for body in ({"name": "alice-laptop", "user": "alice", "team": "research", "rpm": 60},
                 {"name": "batch-pipeline", "team": "research", "priority": "batch", "tpm": 50000},
                 {"name": "grafana", "role": "metrics"}):
        admin.post("/admin/keys", json=body).raise_for_status()
    admin.post("/admin/models/smollm2-support/versions", json={"path": str(default_gguf())}).raise_for_status()
    secrets = {"support-bot": make_key(running, "support-bot", team="research")["key"],
               "notebook": make_key(running, "notebook", user="alice")["key"]}
    chat = {"model": DEFAULT_MODEL, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Count from one to one hundred in words."}]}
    for name, times in (("support-bot", 3), ("notebook", 1)):
        for _ in range(times):
            httpx.post(f"{running.root}/v1/chat/completions", json=chat, timeout=120,
                       headers={"Authorization": f"Bearer {secrets[name]}"}).raise_for_status()
    deadline = time.monotonic() + 60  # metered when the gateway's journal is flushed
    while sum(r["requests"] for r in admin.get("/admin/usage", params={"by": "key"}).json()["rows"]) < 4:
        assert time.monotonic() < deadline, admin.get("/admin/usage", params={"by": "key"}).json()
        time.sleep(0.5)
    # Stand-ins for the ids, numbered in an order that does not change: by kind, then name.
    objects = [o for kind in ("keys", "users", "teams") for o in sorted(admin.get(f"/admin/{kind}").json(),
                                                                       key=lambda o: o["name"])]
    running.ids = {o["id"]: f"{o['id'].partition('_')[0]}_{n:012d}" for n, o in enumerate(objects, 1)}
    # The dashboard shows the replica's lag: wait until it has caught up with what was just made.
    deadline = time.monotonic() + 60
    while any(db["state"] != "in sync" or db["lag_transactions"] for db in admin.get("/admin/system").json()["backup"]):
        assert time.monotonic() < deadline, admin.get("/admin/system").json()["backup"]
        time.sleep(1)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def stopped_clock(monkeypatch):
    """Ages and times as the console shows them, at NOW in UTC whenever and wherever the test runs."""
    monkeypatch.setattr(fmt, "time", SimpleNamespace(time=lambda: NOW))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def console(stack, view: str = "dashboard") -> ConsoleApp:
    return ConsoleApp(PinnedApi(stack.root, stack.admin_key, stack.ids), start=view, refresh_s=1.0)


def test_dashboard(snap_compare, snapshot_stack):
    async def settled(pilot):
        await until(pilot, lambda: any(r[0] == "smollm2-135m-instruct" for r in cells(pilot)), "the models")
        await until(pilot, lambda: laid_out(pilot), "the columns measured")
        await until(pilot, lambda: "version" in str(pilot.app.screen.query_one("#system-panel").render()),
                    "the system panel")
        await pilot.pause(1.5)  # a second scrape: rates (nothing sent, so 0.0) and flat sparklines

    assert snap_compare(console(snapshot_stack), terminal_size=SIZE, run_before=settled)


async def _keys_listed(pilot):
    await until(pilot, lambda: len(cells(pilot)) >= 4, "the keys")
    await until(pilot, lambda: laid_out(pilot), "the columns measured")


def test_keys(snap_compare, snapshot_stack):
    assert snap_compare(console(snapshot_stack, "keys"), terminal_size=SIZE, run_before=_keys_listed)


def test_keys_help(snap_compare, snapshot_stack):
    assert snap_compare(console(snapshot_stack, "keys"), terminal_size=SIZE, run_before=_keys_listed,
                        press=["question_mark"])


def test_new_key_form(snap_compare, snapshot_stack):
    assert snap_compare(console(snapshot_stack, "keys"), terminal_size=SIZE, run_before=_keys_listed,
                        press=["n", *"ci-runner"])


def test_command_prompt(snap_compare, snapshot_stack):
    assert snap_compare(console(snapshot_stack, "keys"), terminal_size=SIZE, run_before=_keys_listed,
                        press=["colon", "d", "a"])


def test_models(snap_compare, snapshot_stack):
    async def listed(pilot):
        await until(pilot, lambda: any(r[0] == "smollm2-support" for r in cells(pilot)), "the registry")
        await until(pilot, lambda: laid_out(pilot), "the columns measured")

    assert snap_compare(console(snapshot_stack, "models"), terminal_size=SIZE, run_before=listed)


def test_usage_by_key_and_model(snap_compare, snapshot_stack):
    async def listed(pilot):
        await until(pilot, lambda: len(cells(pilot)) == 2, "the two keys' usage")
        await until(pilot, lambda: laid_out(pilot), "the columns measured")

    assert snap_compare(console(snapshot_stack, "usage"), terminal_size=SIZE, run_before=listed)


def test_audit(snap_compare, snapshot_stack):
    async def listed(pilot):
        await until(pilot, lambda: any("key.create" in r for r in cells(pilot)), "the audit log")
        await until(pilot, lambda: laid_out(pilot), "the columns measured")

    assert snap_compare(console(snapshot_stack, "audit"), terminal_size=SIZE, run_before=listed)
