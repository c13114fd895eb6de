"""Read this machine's hardware into an Inventory.

GPUs come from NVML (nvidia-ml-py), the CPU from /proc/cpuinfo and psutil, RAM from
psutil, free disk from the file system holding the data directory. Without an NVIDIA
driver the probe says why NVML is unavailable and reports a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

import psutil
import pynvml

from appliance.planning.inventory import CpuInfo, DiskInfo, GpuInfo, GpuProcess, Inventory, NvmlInfo

# Instruction-set flags that decide which llama.cpp CPU kernels can run, as the kernel names them.
ENGINE_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni",
    "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimdhp", "asimddp", "i8mm", "sve", "sve2",  # Arm
)

T = TypeVar("T")

# Why nvmlInit failed, in words an administrator can act on.
NVML_INIT_FAILURES = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "NVML library not found (no NVIDIA driver installed)",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "NVIDIA driver not loaded (no NVIDIA GPU, or the kernel module is not loaded)",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "NVML library and kernel driver versions differ (reboot after a driver upgrade)",
    pynvml.NVML_ERROR_NO_PERMISSION: "no permission to open the NVIDIA devices",
}


def probe(data_dir: Path) -> Inventory:
    """Read this machine: GPUs, CPU, RAM, and free disk where `data_dir` is (or will be)."""
    nvml, gpus = probe_gpus()
    memory = psutil.virtual_memory()
    return Inventory(
        hostname=socket.gethostname(),
        probed_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        cpu=probe_cpu(),
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        disk=probe_disk(data_dir),
        nvml=nvml,
        gpus=gpus,
    )


def probe_gpus() -> tuple[NvmlInfo, list[GpuInfo]]:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlInfo(available=False, reason=NVML_INIT_FAILURES.get(exc.value, f"NVML could not start: {exc}")), []
    try:
        count = pynvml.nvmlDeviceGetCount()
        nvml = NvmlInfo(available=True, driver_version=_optional(pynvml.nvmlSystemGetDriverVersion), cuda_version=_cuda_version())
        gpus = []
        for index in range(count):
            try:
                gpus.append(_read_gpu(index))
            except pynvml.NVMLError as exc:  # a GPU without name, UUID or memory cannot be planned for
                nvml.problems.append(f"GPU {index} left out: {exc}")
        return nvml, gpus
    except pynvml.NVMLError as exc:
        return NvmlInfo(available=False, reason=f"NVML started but could not count the GPUs: {exc}"), []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_gpu(index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        name=pynvml.nvmlDeviceGetName(handle),
        uuid=pynvml.nvmlDeviceGetUUID(handle),
        memory_total_bytes=memory.total,
        memory_free_bytes=memory.free,
        compute_capability=_optional(lambda: "{}.{}".format(*pynvml.nvmlDeviceGetCudaComputeCapability(handle))),
        mig_mode=_optional(lambda: pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE),
        utilization_percent=_optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        temperature_c=_optional(lambda: _temperature(handle)),
        power_watts=_optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000),
        processes=_optional(lambda: _processes(handle)) or [],
    )


def _processes(handle) -> list[GpuProcess]:
    # usedGpuMemory is None where NVML cannot say (NVML_VALUE_NOT_AVAILABLE)
    return [GpuProcess(pid=p.pid, memory_bytes=p.usedGpuMemory)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]


def _optional(read: Callable[[], T]) -> T | None:
    """A reading that some GPUs or drivers do not offer (NotSupported, NoPermission, ...): None then."""
    try:
        return read()
    except pynvml.NVMLError:
        return None


def _cuda_version() -> str | None:
    """The highest CUDA version the driver supports, "12.4" (NVML reports 12040)."""
    for read in (pynvml.nvmlSystemGetCudaDriverVersion_v2, pynvml.nvmlSystemGetCudaDriverVersion):
        version = _optional(read)
        if version:
            return f"{version // 1000}.{version % 1000 // 10}"
    return None


def _temperature(handle) -> int:
    # nvmlDeviceGetTemperatureV replaces the deprecated call; older drivers and bindings have only the latter.
    try:
        return pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU)
    except (AttributeError, pynvml.NVMLError):
        return pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)


def probe_cpu() -> CpuInfo:
    fields = _cpuinfo_fields()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())  # x86 | Arm
    logical = psutil.cpu_count(logical=True) or 1
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        physical_cores=psutil.cpu_count(logical=False) or logical,
        logical_cores=logical,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        flags=[flag for flag in ENGINE_FLAGS if flag in flags],
    )


def _cpuinfo_fields(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields ("model name", "flags", ...); empty where there is no /proc."""
    try:
        first = path.read_text().split("\n\n")[0]
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def probe_disk(data_dir: Path) -> DiskInfo:
    """Free disk where the data directory is, or will be: its nearest existing ancestor."""
    path = Path(data_dir).resolve()
    while not path.exists():
        path = path.parent
    usage = shutil.disk_usage(path)
    return DiskInfo(path=str(path), total_bytes=usage.total, free_bytes=usage.free)
