"""The live dashboard: traffic tiles with sparklines of the last minutes, the system panel
(version, uptime, GPUs, backup lag) and every model with its replicas. Every refresh
updates the widgets in place, so nothing flickers."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from rich.text import Text
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline, Static

from appliance.admin_client import AdminApiError
from tui import format as fmt
from appliance.scrapes import Scrape
from tui.metrics import HISTORY_S, Figures, Window
from tui.modals import DetailScreen, as_yaml
from tui.view import TableView
from tui.widgets import Column

STATE_STYLES = {"ready": "green", "starting": "yellow", "restarting": "yellow", "degraded": "yellow",
                "failed": "bold red", "down": "bold red",
                "stopped": "dim", "open": "bold red", "half-open": "yellow", "closed": "green"}


def styled(value) -> Text:
    text = fmt.text(value)
    return Text(text, style=STATE_STYLES.get(text, ""))


class Tile(Vertical):
    """A figure, its value now and a sparkline of its recent values."""

    def __init__(self, title: str, tile_id: str, points: int) -> None:
        super().__init__(id=tile_id, classes="tile")
        self.title_text = title
        self.history: deque[float] = deque([0.0] * points, maxlen=points)

    def compose(self):
        yield Label(self.title_text, classes="tile-title")
        yield Label("-", classes="tile-value")
        yield Sparkline(list(self.history), classes="tile-spark")

    def show(self, value: str, point: float) -> None:
        self.history.append(point)
        self.query_one(".tile-value", Label).update(value)
        self.query_one(Sparkline).data = list(self.history)


TILES = (("requests / s", "rps"), ("latency p50 · p95", "latency"), ("time to first token p50", "ttft"),
         ("tokens / s", "tokens"), ("errors / s", "errors"))


def _replica_state(engine: dict) -> str:
    """The supervisor's state of an engine it runs (starting, ready, failed…); a remote
    upstream's is its health check's: ready or down."""
    if engine.get("state") and (engine["state"] != "ready" or engine.get("healthy")):
        return engine["state"]
    return "ready" if engine.get("healthy") else "down"


def _model_state(model: dict) -> str:
    states = {_replica_state(engine) for engine in model.get("engines", [])}
    healthy, replicas = model.get("healthy", 0), model.get("replicas", 0)
    if replicas and healthy == replicas:
        return "ready"
    if healthy:
        return "degraded"
    return next((s for s in ("starting", "restarting", "failed") if s in states), "down")


def _gpu_line(gpu: dict) -> str:
    used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
    memory = f"{fmt.size(used)} / {fmt.size(total)}" if used is not None and total else "-"
    util = "-" if gpu.get("utilization_percent") is None else f"{gpu['utilization_percent']}%"
    temp = "-" if gpu.get("temperature_c") is None else f"{gpu['temperature_c']}°C"
    return f"GPU {gpu['index']} {gpu.get('name', '')}: mem {memory}  util {util}  {temp}"


def _backup_line(database: dict) -> str:
    lag = database.get("lag_s")
    lag_text = "-" if lag is None else f"{lag:.1f} s"
    line = f"backup {database['name']}: {database.get('state', '?')}, lag {lag_text}"
    return line + (f" ({database['detail']})" if database.get("detail") else "")


class Dashboard(TableView):
    """What the gateway does now: requests per second, latency, time to first token, tokens
    per second and errors, each with a sparkline of the last five minutes; replicas healthy,
    requests in flight and queued, the cache's hit rate; version, uptime, GPUs and backup lag;
    and every model with its replicas (state, breaker, in flight, and the reason a replica
    failed). Rates are over the last 10 seconds of the gateway's /metrics. enter shows all the
    gateway knows of a model or replica; `/` filters the table."""

    TITLE = "dashboard"
    COLUMNS = (
        Column("name", "MODEL"), Column("replica", "REPLICA"), Column("state", "STATE", lambda r: styled(r["state"])),
        Column("breaker", "BREAKER", lambda r: styled(r.get("breaker"))), Column("in_flight", "IN FLIGHT"),
        Column("queued", "QUEUED"), Column("rps", "REQ/S"), Column("p50", "P50"), Column("p95", "P95"),
        Column("ttft", "TTFT"), Column("tokens", "TOK/S"), Column("errors", "ERR/S"), Column("cache", "CACHE HIT"),
        Column("reason", "REASON"),
    )

    def __init__(self, argument: str = "") -> None:
        super().__init__(argument)
        self.window = Window()
        self.serving: dict = {}
        self.last_error: str | None = None

    def key(self, row: dict) -> str:
        return row["key"]

    def heading(self) -> str:
        return "models and replicas"

    def body(self):
        points = int(HISTORY_S / self.app.refresh_s)
        with Horizontal(id="tiles"):
            for title, tile_id in TILES:
                yield Tile(title, tile_id, points)
        with Horizontal(id="panels"):
            yield Static(id="serving-panel", classes="panel")
            yield Static(id="system-panel", classes="panel")
        yield from super().body()

    def on_mount(self) -> None:  # after View's (Textual calls each class's handler)
        self.set_interval(self.app.refresh_s, self.sample)

    def sample(self) -> None:
        """Scrape even while another view covers the dashboard: its charts have no gaps."""
        if not self.loading:
            self.reload()

    async def fetch(self) -> list[dict]:
        metrics, serving, system = await asyncio.gather(
            self.api.metrics(), self.api.get("/admin/serving"), self.api.get("/admin/system"),
            return_exceptions=True)
        for answer in (metrics, serving, system):
            if isinstance(answer, AdminApiError):
                self._warn(str(answer))
            elif isinstance(answer, BaseException):
                raise answer
        if isinstance(metrics, str):
            self.window.add(Scrape.parse(metrics, time.monotonic()))
        if isinstance(serving, dict):
            self.serving = serving
        self._show_tiles(self.window.figures())
        self._show_serving()
        self._show_system(system if isinstance(system, dict) else None)
        return self._rows()

    def _warn(self, message: str) -> None:
        """An error once, not at every refresh."""
        if message != self.last_error:
            self.last_error = message
            self.notify(message, title="dashboard", severity="error", timeout=8)

    def _show_tiles(self, now: Figures) -> None:
        tiles = {tile_id: self.query_one(f"#{tile_id}", Tile) for _, tile_id in TILES}
        tiles["rps"].show(fmt.rate(now.requests_per_s), now.requests_per_s)
        tiles["latency"].show(f"{fmt.seconds(now.p50_s)} · {fmt.seconds(now.p95_s)}", now.p95_s or 0.0)
        tiles["ttft"].show(fmt.seconds(now.ttft_p50_s), now.ttft_p50_s or 0.0)
        tiles["tokens"].show(fmt.rate(now.tokens_per_s), now.tokens_per_s)
        tiles["errors"].show(fmt.rate(now.errors_per_s), now.errors_per_s)

    def _show_serving(self) -> None:
        models = self.serving.get("models", {})
        healthy = sum(m.get("healthy", 0) for m in models.values())
        total = sum(m.get("replicas", 0) for m in models.values())
        failed = sum(m.get("failed", 0) for m in models.values())
        now = self.window.figures()
        lines = [f"status: {self.app.status}", f"replicas healthy: {healthy}/{total}" + (f", {failed} failed" if failed else ""),
                 f"in flight: {now.in_flight:.0f}   queued: {now.queued:.0f}",
                 f"cache hit rate: {fmt.percent(now.cache_hit_rate)}",
                 f"routes: {', '.join(self.serving.get('routes', {})) or 'none'}"]
        self.query_one("#serving-panel", Static).update("\n".join(lines))

    def _show_system(self, system: dict | None) -> None:
        if system is None:
            self.query_one("#system-panel", Static).update("system: not available")
            return
        lines = [f"version {system.get('version', '?')}, up {fmt.duration(system.get('uptime_s', 0))}, "
                 f"{system.get('workers', '?')} worker(s)"]
        gpus = system.get("gpus") or []
        lines += [_gpu_line(gpu) for gpu in gpus] or [f"GPU: none ({system.get('gpu_error') or 'no GPU found'})"]
        backup = system.get("backup")
        lines += [_backup_line(db) for db in backup] if backup else ["backup: not configured"]
        self.query_one("#system-panel", Static).update("\n".join(lines))

    def _rows(self) -> list[dict]:
        rows = []
        for name, model in self.serving.get("models", {}).items():
            now = self.window.figures(name)
            cache = model.get("cache")
            rows.append({
                "key": name, "name": name, "replica": f"{model.get('healthy', 0)}/{model.get('replicas', 0)}",
                "state": _model_state(model),
                "in_flight": f"{now.in_flight:.0f}", "queued": f"{now.queued:.0f}",
                "rps": fmt.rate(now.requests_per_s), "p50": fmt.seconds(now.p50_s), "p95": fmt.seconds(now.p95_s),
                "ttft": fmt.seconds(now.ttft_p50_s), "tokens": fmt.rate(now.tokens_per_s),
                "errors": fmt.rate(now.errors_per_s),
                "cache": fmt.percent(now.cache_hit_rate if now.cache_hit_rate is not None
                                     else cache and cache.get("hit_rate")) if cache else "off",
                "detail": model,
            })
            for engine in model.get("engines", []):
                index = engine.get("replica", model["engines"].index(engine))
                rows.append({
                    "key": f"{name}#{index}", "name": "", "replica": f"#{index}", "state": _replica_state(engine),
                    "breaker": engine.get("breaker"), "in_flight": engine.get("in_flight"),
                    "reason": engine.get("reason") or engine.get("last_exit"), "detail": engine | {"model": name},
                })
        return rows

    async def open(self, row: dict) -> None:
        title = row["name"] or f"{row['detail']['model']} replica {row['replica']}"
        await self.app.push_screen(DetailScreen(title, as_yaml(row["detail"])))
