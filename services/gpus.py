"""The GPUs' readings for GET /admin/system: memory, utilisation and temperature from NVML.

NVML needs the NVIDIA device nodes, and the gateway, the one process on the LAN, does not
get them everywhere: a bare-metal gateway runs with PrivateDevices=yes. So where the
gateway has no devices, a process that has them (`appliance gpu-sampler`, systemd's
appliance-gpu-sampler.service) takes a reading every SAMPLE_INTERVAL_S and writes it to a
small JSON file in the home (appliance.home.gpu_readings_path), replacing it atomically;
the gateway reads that file and says when it is older than STALE_AFTER_S. Under `appliance
up` the gateway has the machine's devices and reads NVML itself (read_gpus). Which of the
two a gateway does is its runtime's `gpu_readings`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from appliance.planning.inventory import GpuInfo, NvmlInfo
from appliance.planning.probe import probe_gpus

SAMPLE_INTERVAL_S = 2.0  # how often the sampler reads the GPUs
STALE_AFTER_S = 10.0  # a file reading older than this is not shown as the GPUs' state


class GpuReading(msgspec.Struct, kw_only=True):
    """What the sampler writes: the GPUs as /admin/system shows them, and when they were read."""

    sampled_at: float  # Unix seconds
    gpus: list[dict]  # gpu_state of each
    gpu_error: str | None = None
    pid: int | None = None  # the sampler's


def gpu_state(gpu: GpuInfo) -> dict:
    return {"index": gpu.index, "name": gpu.name, "uuid": gpu.uuid,
            "memory_used_bytes": gpu.memory_total_bytes - gpu.memory_free_bytes,
            "memory_total_bytes": gpu.memory_total_bytes, "utilization_percent": gpu.utilization_percent,
            "temperature_c": gpu.temperature_c, "power_watts": gpu.power_watts,
            "processes": [{"pid": p.pid, "memory_bytes": p.memory_bytes} for p in gpu.processes]}


def gpu_error(nvml: NvmlInfo) -> str | None:
    """Why NVML is unavailable, or which GPUs it could not read; None when all is well."""
    return nvml.reason if not nvml.available else "; ".join(nvml.problems) or None


def read_gpus() -> dict:
    """This process's own reading: `gpus`, `gpu_error` and `gpus_read_at` (now)."""
    nvml, gpus = probe_gpus()
    return {"gpus": [gpu_state(gpu) for gpu in gpus], "gpu_error": gpu_error(nvml), "gpus_read_at": time.time()}


def write_reading(path: Path, nvml: NvmlInfo, gpus: list[GpuInfo], at: float | None = None) -> GpuReading:
    """Write probe_gpus' answer to `path`: readers see the old file or the new one, never half of one."""
    reading = GpuReading(sampled_at=time.time() if at is None else at, gpus=[gpu_state(gpu) for gpu in gpus],
                         gpu_error=gpu_error(nvml), pid=os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(msgspec.json.encode(reading))
    os.replace(tmp, path)
    return reading


def read_reading(path: Path, now: float | None = None) -> dict:
    """The sampler's last reading as /admin/system gives it: `gpus`, `gpu_error` and `gpus_read_at`.

    No file, a file that cannot be read, and a reading older than STALE_AFTER_S give no
    GPUs and say why in `gpu_error`; `gpus_read_at` is then the stale reading's time (or null).
    """
    try:
        reading = msgspec.json.decode(path.read_bytes(), type=GpuReading)
    except FileNotFoundError:
        return _unread(f"no GPU reading yet: the GPU sampler has not written {path} (on a bare-metal install: "
                       "appliance-gpu-sampler.service)")
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _unread(f"cannot read the GPU sampler's readings in {path}: {exc}")
    age = (time.time() if now is None else now) - reading.sampled_at
    if age > STALE_AFTER_S:
        return _unread(f"the last GPU reading is {age:.0f} s old (the sampler writes one every "
                       f"{SAMPLE_INTERVAL_S:g} s to {path}): the GPU sampler has stopped or hangs "
                       "(on a bare-metal install: `systemctl status appliance-gpu-sampler`)", reading.sampled_at)
    return {"gpus": reading.gpus, "gpu_error": reading.gpu_error, "gpus_read_at": reading.sampled_at}


def _unread(why: str, read_at: float | None = None) -> dict:
    return {"gpus": [], "gpu_error": why, "gpus_read_at": read_at}


def run_sampler(path: Path, stopping: threading.Event, say: Callable[[str], None],
                interval_s: float = SAMPLE_INTERVAL_S) -> None:
    """Read the GPUs and write them to `path` every `interval_s` until `stopping` is set.

    What it reads is said at the start and whenever that changes (another count of GPUs,
    NVML's reason); a reading that cannot be written (a full disk, a folder gone) is said
    likewise and tried again at the next interval, while the gateway says the last one is stale.
    """
    said = None
    while not stopping.is_set():
        started = time.monotonic()
        nvml, gpus = probe_gpus()
        error = gpu_error(nvml)
        try:
            write_reading(path, nvml, gpus)
            line = (f"GPU readings to {path} every {interval_s:g} s: {f'{len(gpus)} GPU(s)' if gpus else 'no GPU'}"
                    + (f" ({error})" if error else ""))
        except OSError as exc:
            line = f"cannot write the GPU readings to {path}: {exc.strerror or exc}"
        if line != said:
            say(line)
            said = line
        stopping.wait(max(0.0, interval_s - (time.monotonic() - started)))


def run_sampler_until_signalled(path: Path, say: Callable[[str], None], interval_s: float = SAMPLE_INTERVAL_S) -> None:
    """The sampler alone in the foreground (`appliance gpu-sampler`) until SIGTERM or SIGINT."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    run_sampler(path, stopping, say, interval_s)
    say("GPU sampler stopped.")
