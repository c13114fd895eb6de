"""The dashboard against the real stack: traffic sent through the gateway shows as rates,
latencies and tokens per second worked out from /metrics; every served model is listed
with its replicas and their state; the system panel reports the gateway and its GPUs."""

from __future__ import annotations

import asyncio

import pytest

from appliance.planning.inventory import read_inventory
from services.gpus import gpu_state
from tests.appliance.test_probe import INVENTORIES
from tests.conftest import DEFAULT_MODEL
from tests.tui.conftest import cells, notes, select_row, until
from tui import format as fmt
from tui.modals import DetailScreen
from tui.views.dashboard import Tile, _gpu_line

pytestmark = [pytest.mark.stack, pytest.mark.anyio]

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


def tile(pilot, tile_id: str) -> Tile:
    return pilot.app.screen.query_one(f"#{tile_id}", Tile)


def tile_value(pilot, tile_id: str) -> str:
    return str(tile(pilot, tile_id).query_one(".tile-value").render())


def chat(stack, n: int) -> None:
    client = stack.client()
    for i in range(n):
        client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=8, temperature=0,
                                       messages=[SYSTEM, {"role": "user", "content": f"Say a number: {i}"}])


async def test_traffic_shows_as_rates_latency_and_tokens(console, stack):
    async with console() as pilot:
        await until(pilot, lambda: any(r[0] == DEFAULT_MODEL for r in cells(pilot)), "the models table")
        busy = asyncio.create_task(asyncio.to_thread(chat, stack, 6))
        await until(pilot, lambda: tile_value(pilot, "rps") not in ("-", "0.0"), "requests per second")
        await busy
        await until(pilot, lambda: "ms" in tile_value(pilot, "latency") or " s" in tile_value(pilot, "latency"),
                    "a latency")
        assert tile_value(pilot, "tokens") != "0.0"
        assert max(tile(pilot, "rps").history) > 0  # the sparkline has the traffic
        row = next(r for r in cells(pilot) if r[0] == DEFAULT_MODEL)
        assert row[1] == "1/1" and row[2] == "ready"
        assert row[7] != "-"  # its own p50


async def test_models_replicas_and_their_state(console, stack):
    async with console() as pilot:
        await until(pilot, lambda: any(r[0] == "remote-down" for r in cells(pilot)), "every model")
        rows = cells(pilot)
        names = [r[0] for r in rows if r[0]]
        assert DEFAULT_MODEL in names and "remote-ok" in names
        down = rows.index(next(r for r in rows if r[0] == "remote-down"))
        assert rows[down][2] == "down"
        assert rows[down + 1][1] == "#0" and rows[down + 1][2] == "down"  # its replica
        engine = rows.index(next(r for r in rows if r[0] == DEFAULT_MODEL)) + 1
        assert rows[engine][2] == "ready" and rows[engine][3] == "closed"  # the llama.cpp replica and its breaker

        # enter on a replica shows all the gateway knows of it.
        await select_row(pilot, DEFAULT_MODEL)
        pilot.app.screen.table.move_cursor(row=engine)
        await pilot.press("enter")
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen) and pilot.app.screen,
                             "the replica's detail")
        body = screen.body.code  # the YAML shown
        assert "restarts" in body and "base_url" in body
        await pilot.press("escape")

        # / filters the models.
        await pilot.press("slash", *"remote-o")
        await until(pilot, lambda: [r[0] for r in cells(pilot) if r[0]] == ["remote-ok"], "the filtered table")
        await pilot.press("escape")


async def test_system_panel_reports_the_gateway_and_gpus(console):
    async with console() as pilot:
        panel = pilot.app.screen.query_one("#system-panel")
        text = await until(pilot, lambda: "version" in str(panel.render()) and str(panel.render()), "the system panel")
        assert "worker" in text
        assert "GPU" in text  # none here: the panel says why
        assert not any("HTTP" in n for n in notes(pilot))


def test_a_gpu_line_from_a_recorded_h100_probe():
    """What the system panel says of a GPU as GET /admin/system reports it, here one of the
    8x H100 server's recorded probe (no GPU on the test machines)."""
    gpu = gpu_state(read_inventory(INVENTORIES / "server-8x-h100-80gb.json").gpus[3])
    line = _gpu_line(gpu)
    assert line.startswith("GPU 3 NVIDIA H100 80GB HBM3: mem ")
    assert f"{fmt.size(gpu['memory_used_bytes'])} / {fmt.size(gpu['memory_total_bytes'])}" in line
    assert line.endswith(f"util {gpu['utilization_percent']}%  {gpu['temperature_c']}°C")

