"""GET /admin/system: the gateway's version, start and workers, this machine's GPUs (NVML) and
the replicas' lag, on the shared stack (which replicates its state to the session's S3
server); how readings are kept; the conversions, from a recorded GPU probe and from a
replication that cannot be read; and the GPUs of a gateway without devices, from the file a
GPU sampler writes (fresh, stale, missing, unreadable) or from nowhere (k3s)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import msgspec
import psutil
import pytest

from appliance import __version__, permissions
from appliance.config import GatewayConfig
from appliance.planning.inventory import read_inventory
from appliance.planning.probe import probe_gpus
from services.gateway.runtime import GatewayRuntime
from services.gateway.system import Reading, SystemState, read_backup
from services.gpus import STALE_AFTER_S, gpu_state, run_sampler, write_reading
from tests.appliance.test_probe import INVENTORIES, nvidia_smi_gpus
from tests.conftest import appliance, s3_env
from tests.gateway.test_admin_keys import wait_status
from tests.gateway.test_model_registry import api

DATABASE_FIELDS = {"name", "state", "lag_s", "lag_transactions", "detail"}


@pytest.mark.stack
def test_the_stack_reports_its_version_start_gpus_and_replicas_in_sync(stack, stack_store):
    before = time.time()
    system = api(stack).get("/admin/system").json()
    assert system["version"] == __version__ and system["workers"] == 1
    gateway = next(p for p in psutil.Process(stack.proc.pid).children() if "granian" in p.cmdline())
    assert abs(system["started_at"] - gateway.create_time()) < 2  # when the gateway started, not its worker
    assert abs(system["uptime_s"] - (before - system["started_at"])) < 2
    machine = nvidia_smi_gpus()
    assert [[str(g["index"]), g["name"]] for g in system["gpus"]] == [[index, name] for index, _, name in machine]
    if not machine:  # NVML's reason, in words
        assert system["gpus"] == [] and system["gpu_error"] == probe_gpus()[0].reason
    assert time.time() - system["gpus_read_at"] < 5  # read by the gateway itself, which has the machine's devices

    deadline = time.monotonic() + 60  # the replicas catch up within seconds; a reading is kept 15 s
    while True:
        backup = api(stack).get("/admin/system").json()["backup"]
        assert [(db["name"], set(db)) for db in backup] == [("state.db", DATABASE_FIELDS), ("jobs.db", DATABASE_FIELDS)]
        if all(db["state"] == "in sync" for db in backup):
            break
        assert time.monotonic() < deadline, backup
        time.sleep(1)
    assert all(db["lag_s"] == 0 and db["lag_transactions"] == 0 for db in backup), backup
    # the databases `appliance backup status` reports on the home
    local = json.loads(appliance("backup", "status", "--json", home=stack.home, env=s3_env(stack_store)).stdout)
    assert [Path(db["path"]).name for db in local["databases"]] == [db["name"] for db in backup]


@pytest.mark.stack
def test_a_role_without_the_permission_is_refused(stack):
    assert permissions.permission_for("GET", "/admin/system") == "routes.read"  # every staff role holds it
    metrics_key = api(stack).post("/admin/keys", json={"name": "system-metrics", "role": "metrics"}).json()["key"]
    assert wait_status(stack, metrics_key, 403).status_code == 403  # loaded by the gateway: /v1 refuses it
    refused = api(stack, metrics_key).get("/admin/system")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_role", refused.text
    assert api(stack, "not-a-key").get("/admin/system").status_code == 401


def test_a_gpu_reading_from_a_recorded_probe():
    gpu = read_inventory(INVENTORIES / "server-8x-h100-80gb.json").gpus[3]
    assert gpu_state(gpu) == {
        "index": 3, "name": gpu.name, "uuid": gpu.uuid,
        "memory_used_bytes": gpu.memory_total_bytes - gpu.memory_free_bytes,
        "memory_total_bytes": gpu.memory_total_bytes, "utilization_percent": gpu.utilization_percent,
        "temperature_c": gpu.temperature_c, "power_watts": None, "processes": [],
    }
    assert gpu.name == "NVIDIA H100 80GB HBM3" and 0 < gpu_state(gpu)["memory_used_bytes"] < gpu.memory_total_bytes


def test_a_replication_that_cannot_be_read_is_said_per_database(tmp_path):
    config = tmp_path / "run" / "litestream.yml"
    assert read_backup(config, None) == [
        {"name": name, "state": "unknown", "lag_s": None, "lag_transactions": None,
         "detail": f"cannot read the replication status: no litestream config at {config}: replication is not "
                   "running or not configured for this home"}
        for name in ("state.db", "jobs.db")]


def test_without_replication_backup_is_null(tmp_path):
    runtime = GatewayRuntime(home=str(tmp_path), profile="p", gateway=GatewayConfig(workers=3), models=[])
    system = asyncio.run(SystemState(runtime).snapshot())
    assert system["backup"] is None and system["workers"] == 3 and "home" not in system


def test_a_reading_is_taken_once_for_callers_that_come_together_and_kept_for_a_while():
    reads, threads = [], set()

    def read() -> int:
        threads.add(threading.get_ident())
        time.sleep(0.2)
        reads.append(time.monotonic())
        return len(reads)

    async def scenario() -> list[int]:
        reading = Reading(read, keep_s=0.5)
        together = await asyncio.gather(*(reading.get() for _ in range(5)))
        kept = await reading.get()
        await asyncio.sleep(0.5)
        return [*together, kept, await reading.get()]

    assert asyncio.run(scenario()) == [1, 1, 1, 1, 1, 1, 2]
    assert threading.get_ident() not in threads  # read on a thread, off the event loop


def runtime_reading(tmp_path: Path, **fields) -> GatewayRuntime:
    return GatewayRuntime(home=str(tmp_path), profile="p", gateway=GatewayConfig(), models=[], **fields)


def system_of(runtime: GatewayRuntime) -> dict:
    return asyncio.run(SystemState(runtime).snapshot())


def test_a_sampler_s_reading_of_a_recorded_probe_reaches_the_gateway(tmp_path):
    """What the sampler writes from probe_gpus' answer (here the recorded 8x H100 probe) is what
    a gateway without the devices reports, with the time it was read."""
    inventory = read_inventory(INVENTORIES / "server-8x-h100-80gb.json")
    readings = tmp_path / "run" / "gpus.json"
    written = write_reading(readings, inventory.nvml, inventory.gpus)
    assert [p.name for p in readings.parent.iterdir()] == ["gpus.json"]  # the temporary file was renamed
    system = system_of(runtime_reading(tmp_path, gpu_readings=str(readings)))
    assert system["gpus"] == [gpu_state(gpu) for gpu in inventory.gpus] and len(system["gpus"]) == 8
    assert system["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3" and system["gpu_error"] is None
    assert system["gpus_read_at"] == written.sampled_at and time.time() - written.sampled_at < 5

    # A GPU that NVML lists but cannot read is named, as the gateway's own reading names it.
    nvml = msgspec.structs.replace(inventory.nvml, problems=["GPU 7 left out: GPU is lost"])
    write_reading(readings, nvml, inventory.gpus[:7])
    system = system_of(runtime_reading(tmp_path, gpu_readings=str(readings)))
    assert len(system["gpus"]) == 7 and system["gpu_error"] == "GPU 7 left out: GPU is lost"


def test_a_stale_missing_or_unreadable_reading_shows_no_gpus_and_says_why(tmp_path):
    inventory = read_inventory(INVENTORIES / "server-8x-h100-80gb.json")
    readings = tmp_path / "run" / "gpus.json"
    runtime = runtime_reading(tmp_path, gpu_readings=str(readings))

    missing = system_of(runtime)
    assert missing["gpus"] == [] and missing["gpus_read_at"] is None
    assert missing["gpu_error"].startswith(f"no GPU reading yet: the GPU sampler has not written {readings}")

    at = time.time() - 3 * STALE_AFTER_S  # the sampler stopped 30 s ago
    write_reading(readings, inventory.nvml, inventory.gpus, at=at)
    stale = system_of(runtime)
    assert stale["gpus"] == [] and stale["gpus_read_at"] == at  # old numbers are not shown as the GPUs' state
    assert stale["gpu_error"].startswith("the last GPU reading is 30 s old") and "appliance-gpu-sampler" in stale["gpu_error"]

    write_reading(readings, inventory.nvml, inventory.gpus, at=time.time() - STALE_AFTER_S + 2)  # old, not stale
    assert len(system_of(runtime)["gpus"]) == 8

    readings.write_text('{"sampled_at": "yesterday"')
    broken = system_of(runtime)
    assert broken["gpus"] == [] and broken["gpu_error"].startswith(f"cannot read the GPU sampler's readings in {readings}: ")


def test_a_gateway_told_it_has_no_gpus_says_so_instead_of_nvml(tmp_path):
    system = system_of(runtime_reading(tmp_path, no_gpus_reason="on k3s the gateway's pod has no GPU"))
    assert (system["gpus"], system["gpu_error"], system["gpus_read_at"]) == ([], "on k3s the gateway's pod has no GPU", None)


def test_the_sampler_keeps_sampling_through_a_failed_write_and_says_so_once(tmp_path):
    """run_sampler on a thread with this machine's NVML: a reading it cannot write is said once
    and tried again; once it can write, readings follow every interval."""
    readings = tmp_path / "run" / "gpus.json"
    (tmp_path / "run").write_text("not a folder")
    said, stopping = [], threading.Event()
    sampler = threading.Thread(target=run_sampler, args=(readings, stopping, said.append, 0.2))
    sampler.start()
    try:
        time.sleep(0.7)
        assert len(said) == 1 and said[0].startswith(f"cannot write the GPU readings to {readings}: "), said
        (tmp_path / "run").unlink()
        deadline = time.monotonic() + 10
        while not readings.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = json.loads(readings.read_text())["sampled_at"]
        time.sleep(0.5)
        assert json.loads(readings.read_text())["sampled_at"] > first
    finally:
        stopping.set()
        sampler.join(5)
    assert not sampler.is_alive()
    assert len(said) == 2 and said[1].startswith(f"GPU readings to {readings} every 0.2 s: "), said
