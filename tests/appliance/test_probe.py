"""The hardware probe on this machine, for real, and the recorded inventories the planner is tested with."""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from appliance.errors import InstallError
from appliance.planning.inventory import read_inventory
from appliance.planning.probe import probe
from appliance.planning_cli import describe_inventory
from tests.conftest import appliance

INVENTORIES = Path(__file__).parents[1] / "inventories"


def nvidia_smi_gpus() -> list[list[str]]:
    """index, uuid and name of every GPU as nvidia-smi (not our code) lists them; [] without a driver."""
    if not shutil.which("nvidia-smi"):
        return []
    result = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return []
    return [[field.strip() for field in line.split(",")] for line in result.stdout.splitlines() if line.strip()]


def nvml_library_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(bool(nvidia_smi_gpus()), reason="this machine has NVIDIA GPUs")
def test_cpu_only_machine_is_reported_with_the_reason(tmp_path):
    inventory = probe(tmp_path / "not" / "created")
    assert inventory.cpu_only and inventory.gpus == []
    if not inventory.nvml.available:
        assert inventory.nvml.reason
    if not nvml_library_loads():
        assert inventory.nvml.reason == "NVML library not found (no NVIDIA driver installed)"
        assert inventory.nvml.driver_version is None and inventory.nvml.cuda_version is None


@pytest.mark.skipif(not nvidia_smi_gpus(), reason="no NVIDIA GPU on this machine")
def test_gpu_machine_lists_every_gpu_nvidia_smi_lists(tmp_path):
    inventory = probe(tmp_path)
    assert inventory.nvml.available and inventory.nvml.driver_version and inventory.nvml.cuda_version
    assert [[str(g.index), g.uuid, g.name] for g in inventory.gpus] == nvidia_smi_gpus()
    for gpu in inventory.gpus:
        assert 0 < gpu.memory_free_bytes <= gpu.memory_total_bytes
        assert re.fullmatch(r"\d+\.\d+", gpu.compute_capability)


def test_cpu_ram_and_disk_agree_with_the_system(tmp_path):
    inventory = probe(tmp_path / "not" / "created")
    cpu = inventory.cpu
    assert cpu.model
    assert cpu.logical_cores == psutil.cpu_count() and 0 < cpu.physical_cores <= cpu.logical_cores
    kernel_flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split())
    assert cpu.avx2 == ("avx2" in kernel_flags) and cpu.avx512 == ("avx512f" in kernel_flags)
    assert set(cpu.flags) <= kernel_flags and ("avx2" in cpu.flags) == cpu.avx2
    assert inventory.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < inventory.memory_available_bytes <= inventory.memory_total_bytes
    # the data directory does not exist yet: its nearest existing parent is measured
    assert inventory.disk.path == str(tmp_path.resolve())
    assert 0 < inventory.disk.free_bytes <= inventory.disk.total_bytes == shutil.disk_usage(tmp_path).total
    assert abs(inventory.disk.free_bytes - shutil.disk_usage(tmp_path).free) < 2**30
    probed_at = datetime.fromisoformat(inventory.probed_at)
    assert probed_at.tzinfo == timezone.utc and abs(datetime.now(timezone.utc) - probed_at) < timedelta(minutes=1)
    assert inventory.hostname


def test_probe_json_round_trips_through_read_inventory(tmp_path):
    saved = tmp_path / "inventory.json"
    out = appliance("probe", "--json", "--output", str(saved), home=tmp_path / "home").stdout
    printed = tmp_path / "printed.json"
    printed.write_text(out)
    inventory = read_inventory(printed)
    assert read_inventory(saved) == inventory
    assert json.loads(out) == json.loads(saved.read_text())
    assert inventory.disk.path == str(tmp_path.resolve())
    assert not (tmp_path / "home").exists(), "probing creates nothing"


def test_human_report_says_cpu_only_and_avx2():
    out = appliance("probe").stdout
    inventory = probe(Path("var"))
    assert f"AVX2 {'yes' if inventory.cpu.avx2 else 'no'}" in out
    assert f"AVX-512 {'yes' if inventory.cpu.avx512 else 'no'}" in out
    assert "RAM" in out and "free of" in out
    if inventory.cpu_only:
        assert "CPU-only machine" in out
        if not inventory.nvml.available:
            assert f"NVML: {inventory.nvml.reason}" in out


def test_human_report_of_a_gpu_server():
    out = describe_inventory(read_inventory(INVENTORIES / "server-8x-h100-80gb.json"))
    assert "NVIDIA   driver 565.57.01, CUDA 12.7" in out
    assert len(re.findall(r"^GPU \d .*NVIDIA H100 80GB HBM3: 79\.21 GiB free of 79\.65 GiB, compute 9\.0, MIG off", out, re.MULTILINE)) == 8
    assert "CPU-only" not in out
    assert "MIG on" in describe_inventory(read_inventory(INVENTORIES / "server-1x-h100-80gb-mig.json"))


def test_unwritable_output_is_a_clear_error(tmp_path):
    target = tmp_path / "missing-dir" / "inventory.json"
    result = appliance("probe", "--output", str(target), check=False)
    assert result.returncode == 1
    assert f"error: {target}: cannot write the inventory" in result.stderr and "Traceback" not in result.stderr


def test_the_planner_has_the_machines_it_needs():
    names = {path.stem for path in INVENTORIES.glob("*.json")}
    assert {"edge-cpu-here", "workstation-1x-l4", "server-1x-h100-80gb", "server-4x-a100-80gb",
            "server-8x-h100-80gb", "node-1x-t4"} <= names


@pytest.mark.parametrize("path", sorted(INVENTORIES.glob("*.json")), ids=lambda p: p.stem)
def test_recorded_inventory_is_sane(path):
    inventory = read_inventory(path)
    assert inventory.source, "a recorded inventory says where its readings came from"
    assert inventory.cpu_only == (not inventory.gpus)
    cpu = inventory.cpu
    assert 0 < cpu.physical_cores <= cpu.logical_cores
    assert cpu.avx2 == ("avx2" in cpu.flags) and cpu.avx512 == ("avx512f" in cpu.flags)
    assert 0 < inventory.memory_available_bytes <= inventory.memory_total_bytes
    assert 0 < inventory.disk.free_bytes <= inventory.disk.total_bytes
    datetime.fromisoformat(inventory.probed_at)
    if not inventory.nvml.available:
        assert inventory.nvml.reason and inventory.cpu_only
    gpus = inventory.gpus
    assert [g.index for g in gpus] == list(range(len(gpus))), "indexes are unique, in order"
    assert len({g.uuid for g in gpus}) == len(gpus)
    if gpus:
        assert inventory.nvml.available and inventory.nvml.driver_version
        assert re.fullmatch(r"\d+\.\d+", inventory.nvml.cuda_version)
    for gpu in gpus:
        assert 0 < gpu.memory_free_bytes <= gpu.memory_total_bytes
        assert re.fullmatch(r"\d+\.\d+", gpu.compute_capability)
        assert gpu.uuid.startswith("GPU-")


@pytest.mark.parametrize("content, detail", [
    (b"{not json", "not an inventory written by `appliance probe --json`"),
    (b'{"hostname": 7}', "not an inventory written by `appliance probe --json`"),
])
def test_malformed_inventory_names_the_file(tmp_path, content, detail):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(InstallError) as caught:
        read_inventory(path)
    assert caught.value.message.startswith(f"{path}: {detail}")


def test_missing_inventory_names_the_file(tmp_path):
    with pytest.raises(InstallError, match=re.escape(f"{tmp_path / 'nope.json'}: cannot read the inventory")):
        read_inventory(tmp_path / "nope.json")
