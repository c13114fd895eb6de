"""Room for a fine-tuning job on a GPU, beside serving: serving is never starved.

A GPU's room for training is what NVML says is free, less what the serving plan gives
engine replicas that hold none of it now (starting, restarting or failed and retried:
their memory comes back when they do), less a margin. The job takes the GPU with the most
room if its estimate fits; otherwise it waits in the queue and says why.
"""

from __future__ import annotations

from collections.abc import Iterable

from appliance.cli_format import size
from appliance.planning.inventory import GpuInfo
from services.engines.status import ReplicaStatus

MARGIN = 0.05  # of each GPU's memory, never given to training
CUDA_CONTEXT_BYTES = 1 << 30  # torch's CUDA context and allocator slack
ACTIVATION_TENSORS = 20  # float32 tensors of batch x sequence x width each layer keeps for the backward pass


def training_bytes(card: dict, batch_size: int, sequence_length: int) -> int:
    """What a LoRA job on the base of `card` (its GGUF facts) takes on a GPU: the base in
    float32, the activations the backward pass keeps, and the CUDA context. The adapter and
    its optimizer state are small beside them."""
    weights = (card.get("parameters") or 0) * 4
    activations = (batch_size * sequence_length * (card.get("embedding_length") or 0) * (card.get("layers") or 0)
                   * ACTIVATION_TENSORS * 4)
    return weights + activations + CUDA_CONTEXT_BYTES


def reserved_by_serving(statuses: Iterable[ReplicaStatus]) -> dict[int, int]:
    """Per GPU index: what the plan gives replicas that are not holding it now."""
    reserved: dict[int, int] = {}
    for status in statuses:
        if status.state != "ready":
            for index in status.gpus:
                reserved[index] = reserved.get(index, 0) + status.gpu_bytes
    return reserved


def room(gpu: GpuInfo, reserved: dict[int, int]) -> int:
    return gpu.memory_free_bytes - reserved.get(gpu.index, 0) - int(gpu.memory_total_bytes * MARGIN)


def choose_gpu(need: int, gpus: list[GpuInfo], reserved: dict[int, int]) -> tuple[int | None, str]:
    """The GPU with the most room if `need` fits there: (index, ""); else (None, why it waits)."""
    if not gpus:
        return None, "no GPU could be read (NVML)"
    best = max(gpus, key=lambda g: room(g, reserved))
    if room(best, reserved) >= need:
        return best.index, ""
    held = reserved.get(best.index, 0)
    return None, (f"waiting for GPU memory: the job needs about {size(need)}; the most any GPU has beside serving "
                  f"is {size(max(room(best, reserved), 0))} (GPU {best.index}: {size(best.memory_free_bytes)} free"
                  + (f", {size(held)} of it planned for engine replicas that are starting" if held else "") + ")")
