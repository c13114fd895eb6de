"""The plan: where each model replica runs and with which engine settings.

`appliance.planning.planner` produces it from a profile and the inventories of the machines;
the systemd and k3s renderers and `appliance up` deploy from it. Sizes are bytes.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class MemoryEstimate(msgspec.Struct, kw_only=True):
    """Memory one replica needs, from the model files alone."""

    weights_bytes: int
    kv_cache_bytes: int  # for the planned context length and parallel sequences
    compute_bytes: int  # the engine's scratch buffers for one batch
    runtime_bytes: int  # the engine process itself (interpreter, libraries)
    total_bytes: int
    basis: str  # what the numbers were read from, e.g. "GGUF metadata" or "config.json + safetensors"


class Placement(msgspec.Struct, kw_only=True):
    """One replica: on which node, on the CPU or on which GPUs (indexes on that node)."""

    node: str
    device: Literal["cpu", "gpu"]
    gpus: list[int] = []
    threads: int | None = None  # llama.cpp: CPU threads of this replica (its share of the node's cores)
    gpu_bytes: int = 0  # planned use of each of those GPUs
    ram_bytes: int = 0  # planned use of the node's RAM


class ModelPlan(msgspec.Struct, kw_only=True):
    name: str
    engine: Literal["llamacpp", "vllm", "remote"]
    replicas: list[Placement] = []
    context_length: int | None = None  # per sequence
    # Sequences served at once: llama.cpp's parallel slots (each with context_length of KV
    # cache), vLLM's --max-num-seqs.
    max_num_seqs: int | None = None
    estimate: MemoryEstimate | None = None  # None for remote models
    # llama.cpp
    gpu_layers: int | None = None  # -1: every layer on the GPU; 0: CPU only; N: the first N layers
    layers: int | None = None  # layers the model has
    # vLLM
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    notes: list[str] = []


class DeviceUse(msgspec.Struct, kw_only=True):
    """What the plan leaves on one device: a node's RAM or one of its GPUs."""

    node: str
    device: str  # "ram" or "gpu0", "gpu1", ...
    total_bytes: int
    planned_bytes: int
    free_after_bytes: int


class Plan(msgspec.Struct, kw_only=True):
    profile: str
    nodes: list[str]
    models: list[ModelPlan]
    devices: list[DeviceUse]
    disk_needed_bytes: int = 0  # model files copied into the data directory
    disk_free_bytes: int | None = None

    def model(self, name: str) -> ModelPlan:
        return next(m for m in self.models if m.name == name)


def planned_model(model, mp: ModelPlan, placement: Placement):
    """The profile's ModelConfig with the plan's engine settings for one replica filled in."""
    return msgspec.structs.replace(
        model,
        context_length=mp.max_model_len or mp.context_length or model.context_length,
        gpu_layers=0 if placement.device == "cpu" else (mp.gpu_layers if mp.gpu_layers is not None else -1),
        gpus=mp.tensor_parallel_size or len(placement.gpus) or None,
        gpu_memory_utilization=mp.gpu_memory_utilization or model.gpu_memory_utilization,
        max_num_seqs=mp.max_num_seqs or model.max_num_seqs,
        threads=model.threads or placement.threads,
    )
