"""What a machine has: the inventory `appliance probe` reports and the planner sizes against.

An inventory is plain data (msgspec Structs, JSON on disk), so inventories recorded on
real machines can be saved as files and planned against anywhere: the planner never
needs the hardware it plans for. Sizes are bytes.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from appliance.errors import InstallError


class GpuProcess(msgspec.Struct, kw_only=True):
    pid: int
    memory_bytes: int | None = None  # None where the driver does not say (some vGPU and MIG setups)


class GpuInfo(msgspec.Struct, kw_only=True):
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: str | None = None  # "9.0"
    mig_mode: bool | None = None  # None: the GPU does not support MIG
    utilization_percent: int | None = None
    temperature_c: int | None = None
    power_watts: float | None = None
    processes: list[GpuProcess] = []  # the compute processes on it (an engine, a training job)


class NvmlInfo(msgspec.Struct, kw_only=True):
    available: bool
    reason: str | None = None  # why NVML could not be used, when it could not
    driver_version: str | None = None
    cuda_version: str | None = None  # highest CUDA version the driver supports, "12.4"
    problems: list[str] = []  # GPUs NVML lists but could not read, e.g. "GPU 1 left out: GPU is lost"


class CpuInfo(msgspec.Struct, kw_only=True):
    model: str
    physical_cores: int
    logical_cores: int
    avx2: bool
    avx512: bool
    flags: list[str] = []  # the instruction-set flags that matter to engines, as the kernel names them


class DiskInfo(msgspec.Struct, kw_only=True):
    path: str  # the data directory (or the nearest existing parent) that was measured
    total_bytes: int
    free_bytes: int


class Inventory(msgspec.Struct, kw_only=True):
    hostname: str
    probed_at: str  # ISO 8601, UTC
    cpu: CpuInfo
    memory_total_bytes: int
    memory_available_bytes: int
    disk: DiskInfo
    nvml: NvmlInfo
    gpus: list[GpuInfo] = []
    source: str | None = None  # for recorded inventories: where the readings came from

    @property
    def cpu_only(self) -> bool:
        return not self.gpus


def read_inventory(path: Path) -> Inventory:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Inventory)
    except OSError as exc:
        raise InstallError(f"{path}: cannot read the inventory: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InstallError(f"{path}: not an inventory written by `appliance probe --json`: {exc}") from None


def encode_inventory(inventory: Inventory) -> bytes:
    return msgspec.json.format(msgspec.json.encode(inventory), indent=2)
