"""The planner: where each replica of each model runs, and with which engine settings.

Input: a profile and the inventories of the machines (one for a box, one per node for a
cluster). Output: a Plan, or a PlanError whose message has the numbers that show why a
model does not fit. Memory comes from appliance.planning.estimate (model files only).

Rules, in order:
- vLLM models are placed first (they need whole GPUs), then llama.cpp, then remote
  models (no resources). Replicas of one model spread over nodes, then over GPUs.
- llama.cpp: every layer on one GPU when it fits; else as many layers as fit (partial
  offload, the rest in RAM); else the CPU. `gpu_layers` in the profile overrides this.
  Replicas on one node share the weights through the page cache (the file is mmapped),
  so RAM counts them once per node. Each replica serves LLAMACPP_SLOTS sequences at
  once (parallel slots, each with context_length tokens of KV cache), fewer when that
  does not fit, or the profile's max_num_seqs; the llama.cpp replicas on a node share
  its physical cores as threads, unless the profile sets `threads`.
- vLLM: the smallest tensor-parallel size (1, 2, 4, 8) whose share of weights and one
  full-length sequence of KV cache fits; it gets the GPUs' free memory (at most
  MAX_GPU_UTILIZATION) and max_num_seqs is what that KV cache holds at max_model_len.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from appliance.config import Profile, ModelConfig
from appliance.errors import PlanError
from appliance.planning.estimate import (
    CUDA_CONTEXT_BYTES,
    GiB,
    ModelShape,
    gib,
    llamacpp_estimate,
    model_shape,
    vllm_estimate,
)
from appliance.planning.inventory import Inventory
from appliance.planning.plan_model import DeviceUse, MemoryEstimate, ModelPlan, Placement, Plan

RAM_RESERVE_BYTES = 1 * GiB  # the OS and the appliance's own processes on each node
GPU_RESERVE_FRACTION = 0.05  # left free on every GPU
MAX_GPU_UTILIZATION = 0.90
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's own default
# llama.cpp slots tried, most first. Slots beyond the concurrent requests cost only KV
# memory; on CPU 8 slots more than double the decode throughput of one at concurrency 8
# (docs/benchmarks.md, "Engine batching").
LLAMACPP_SLOTS = (8, 4, 2, 1)
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


@dataclass
class Gpu:
    index: int
    name: str
    total: int
    free: int  # what the plan may still use

    @property
    def label(self) -> str:
        return f"gpu{self.index}"


@dataclass
class Node:
    name: str
    ram_total: int
    ram_free: int
    cores: int
    gpus: list[Gpu]
    whole_gpus: bool  # one replica per GPU (Kubernetes hands out whole GPUs)
    mapped: set[str] = field(default_factory=set)  # model files already counted in this node's RAM

    @classmethod
    def of(cls, inventory: Inventory, whole_gpus: bool) -> Node:
        gpus = [Gpu(g.index, g.name, g.memory_total_bytes, int(g.memory_free_bytes - g.memory_total_bytes * GPU_RESERVE_FRACTION))
                for g in inventory.gpus if not g.mig_mode]
        return cls(inventory.hostname, inventory.memory_total_bytes, inventory.memory_available_bytes - RAM_RESERVE_BYTES,
                   inventory.cpu.physical_cores, gpus, whole_gpus)

    def take(self, gpu: Gpu, nbytes: int) -> None:
        gpu.free = 0 if self.whole_gpus else gpu.free - nbytes


def choose_profile(inventories: list[Inventory]) -> str:
    """`--profile auto`: the built-in profile that matches the hardware."""
    if len(inventories) > 1:
        return "small-cluster"
    gpus = len(inventories[0].gpus)
    return "edge-cpu" if gpus == 0 else "single-gpu" if gpus == 1 else "multi-gpu"


def make_plan(profile: Profile, inventories: list[Inventory], *, whole_gpus: bool = False) -> Plan:
    """Place every model of `profile` on the machines. `whole_gpus`: never put two
    replicas on one GPU (k3s gives each pod whole GPUs)."""
    if not inventories:
        raise PlanError("no machine to plan for: give at least one inventory")
    names = [inv.hostname for inv in inventories]
    if len(set(names)) != len(names):
        raise PlanError(f"two inventories have the same hostname: {', '.join(names)}")
    nodes = [Node.of(inv, whole_gpus) for inv in inventories]
    mig = [f"{inv.hostname} gpu{g.index}" for inv in inventories for g in inv.gpus if g.mig_mode]
    for model in profile.models:
        if model.node and model.node not in names:
            raise PlanError(f"model '{model.name}': node {model.node!r} is not among the inventories ({', '.join(names)})")
    plans: dict[str, ModelPlan] = {}
    shapes: dict[str, ModelShape] = {}
    order = sorted(profile.models, key=lambda m: {"vllm": 0, "llamacpp": 1, "remote": 2}[m.engine])
    for model in order:
        if model.engine == "remote":
            plans[model.name] = ModelPlan(name=model.name, engine="remote", notes=[f"forwards to {model.base_url}"])
            continue
        shape = shapes.get(model.path) or shapes.setdefault(model.path, model_shape(model.path))
        place = _place_vllm if model.engine == "vllm" else _place_llamacpp
        plans[model.name] = place(model, shape, nodes)
    _share_cores(profile, plans, nodes)
    if mig:
        for mp in plans.values():
            if mp.engine != "remote":
                mp.notes.append(f"left out, MIG mode is on (MIG instances are not planned): {', '.join(mig)}")
    disk = sum(s.weights_bytes for s in shapes.values())  # the model files the install copies
    return Plan(
        profile=profile.name,
        nodes=names,
        models=[plans[m.name] for m in profile.models],
        devices=_devices(nodes, inventories),
        disk_needed_bytes=disk,
        disk_free_bytes=inventories[0].disk.free_bytes,
    )


def _candidate_nodes(model: ModelConfig, nodes: list[Node], placed: list[Placement]) -> list[Node]:
    """Nodes to try for the next replica: the pinned one, else the least used by this model first."""
    if model.node:
        return [n for n in nodes if n.name == model.node]
    return sorted(nodes, key=lambda n: sum(p.node == n.name for p in placed))


def _context_notes(model: ModelConfig, shape: ModelShape) -> list[str]:
    if shape.trained_context and model.context_length > shape.trained_context:
        return [f"context_length {model.context_length} is beyond the {shape.trained_context} tokens the model was trained for"]
    return []


def _place_llamacpp(model: ModelConfig, shape: ModelShape, nodes: list[Node]) -> ModelPlan:
    """The most slots (LLAMACPP_SLOTS, or the profile's max_num_seqs) with which every replica fits."""
    counts = [model.max_num_seqs] if model.max_num_seqs else LLAMACPP_SLOTS
    for slots in counts:
        trial = copy.deepcopy(nodes)
        try:
            plan = _place_llamacpp_slots(model, shape, trial, slots)
        except PlanError as exc:
            refusal = exc
            continue
        nodes[:] = trial
        if slots != counts[0]:
            plan.notes.append(f"{slots} parallel slots: {counts[0]} do not fit")
        return plan
    raise refusal


def _place_llamacpp_slots(model: ModelConfig, shape: ModelShape, nodes: list[Node], slots: int) -> ModelPlan:
    context = model.context_length
    cpu = llamacpp_estimate(shape, context, slots)
    plan = ModelPlan(name=model.name, engine="llamacpp", context_length=context, max_num_seqs=slots, estimate=cpu,
                     layers=shape.layers, notes=_context_notes(model, shape))
    per_layer = (shape.weights_bytes + shape.kv_bytes_per_token * context * slots) // shape.layers
    gpu_fixed = cpu.compute_bytes + CUDA_CONTEXT_BYTES  # on the GPU whatever the number of layers
    for replica in range(model.replicas):
        placement = None
        for node in _candidate_nodes(model, nodes, plan.replicas):
            placement = _llamacpp_on(node, model, shape, plan, cpu, per_layer, gpu_fixed)
            if placement:
                break
        if placement is None:
            raise PlanError(_no_room_llamacpp(model, replica, slots, cpu, nodes))
        plan.replicas.append(placement)
    if plan.gpu_layers and plan.gpu_layers != -1:
        plan.notes.append(f"partial offload: {plan.gpu_layers} of {shape.layers} layers on the GPU, the rest on the CPU")
    return plan


def _llamacpp_on(node: Node, model: ModelConfig, shape: ModelShape, plan: ModelPlan, cpu, per_layer: int, gpu_fixed: int) -> Placement | None:
    """One replica on `node`, keeping the model's gpu_layers once the first replica set it."""
    shared = model.path in node.mapped  # weights already in this node's page cache
    ram_cpu = cpu.total_bytes - (shape.weights_bytes if shared else 0)
    wanted = model.gpu_layers if model.gpu_layers is not None else plan.gpu_layers
    if node.gpus and wanted != 0:
        gpu = max(node.gpus, key=lambda g: g.free)
        fits = max(0, (gpu.free - gpu_fixed) // per_layer) if gpu.free > gpu_fixed else 0
        layers = shape.layers if wanted in (None, -1) else min(wanted, shape.layers)
        if wanted is None:
            layers = min(layers, fits)
        if layers and layers <= fits:
            on_gpu = gpu_fixed + per_layer * layers
            ram = cpu.runtime_bytes + per_layer * (shape.layers - layers)
            if ram <= node.ram_free:
                node.take(gpu, on_gpu)
                node.ram_free -= ram
                plan.gpu_layers = -1 if layers == shape.layers else layers
                return Placement(node=node.name, device="gpu", gpus=[gpu.index], gpu_bytes=on_gpu, ram_bytes=ram)
        if wanted is not None:  # a fixed GPU setting that does not fit here
            return None
    if wanted not in (None, 0) or ram_cpu > node.ram_free:
        return None
    node.ram_free -= ram_cpu
    node.mapped.add(model.path)
    plan.gpu_layers = 0
    return Placement(node=node.name, device="cpu", ram_bytes=ram_cpu)


def _share_cores(profile: Profile, plans: dict[str, ModelPlan], nodes: list[Node]) -> None:
    """Each llama.cpp replica's threads: the profile's `threads`, else its node's physical
    cores split among the llama.cpp replicas there."""
    threads = {m.name: m.threads for m in profile.models}
    for node in nodes:
        here = [(mp.name, p) for mp in plans.values() if mp.engine == "llamacpp" for p in mp.replicas if p.node == node.name]
        for name, placement in here:
            placement.threads = threads[name] or max(1, node.cores // len(here))


def _no_room_llamacpp(model: ModelConfig, replica: int, slots: int, estimate: MemoryEstimate, nodes: list[Node]) -> str:
    e = estimate
    sequences = f"{slots} parallel sequences of {model.context_length} tokens" if slots > 1 else f"{model.context_length} tokens"
    need = (f"needs {gib(e.total_bytes)} (weights {gib(e.weights_bytes)} + KV cache {gib(e.kv_cache_bytes)} for "
            f"{sequences} + compute {gib(e.compute_bytes)} + runtime {gib(e.runtime_bytes)})")
    room = "; ".join(
        f"{n.name}: RAM {gib(max(n.ram_free, 0))} free of {gib(n.ram_total)}"
        + "".join(f", {g.label} {gib(max(g.free, 0))} free of {gib(g.total)}" for g in n.gpus)
        for n in nodes
    )
    return (f"model '{model.name}' replica {replica + 1} of {model.replicas} does not fit: it {need}; left after the "
            f"models before it: {room}. Lower context_length, max_num_seqs or replicas, or use a smaller quantisation.")


def _place_vllm(model: ModelConfig, shape: ModelShape, nodes: list[Node]) -> ModelPlan:
    max_len = model.context_length
    plan = ModelPlan(name=model.name, engine="vllm", context_length=max_len, max_model_len=max_len,
                     notes=_context_notes(model, shape))
    sizes = [model.gpus] if model.gpus else list(TENSOR_PARALLEL_SIZES)
    for replica in range(model.replicas):
        tried: list[str] = []
        for node in _candidate_nodes(model, nodes, plan.replicas):
            placement = _vllm_on(node, model, shape, plan, sizes, tried)
            if placement:
                plan.replicas.append(placement)
                break
        else:
            minimum = vllm_estimate(shape, max_len, 1, sizes[0])
            raise PlanError(
                f"model '{model.name}' replica {replica + 1} of {model.replicas} does not fit on any GPU: with "
                f"tensor parallel {sizes[0]} each GPU needs at least {gib(minimum.total_bytes)} (weights "
                f"{gib(minimum.weights_bytes)} + KV cache for one {max_len}-token sequence {gib(minimum.kv_cache_bytes)} "
                f"+ activations {gib(minimum.compute_bytes)} + CUDA {gib(minimum.runtime_bytes)}); "
                + ("; ".join(tried) or "no node has a GPU") + ". Lower context_length, or use more or larger GPUs."
            )
    return plan


def _vllm_on(node: Node, model: ModelConfig, shape: ModelShape, plan: ModelPlan, sizes: list[int], tried: list[str]) -> Placement | None:
    for tp in sizes:
        if plan.tensor_parallel_size and tp != plan.tensor_parallel_size:
            continue  # every replica of a model runs with the same settings
        if tp > len(node.gpus):
            continue
        gpus = sorted(node.gpus, key=lambda g: g.free, reverse=True)[:tp]
        minimum = vllm_estimate(shape, model.context_length, 1, tp)
        smallest = min(gpus, key=lambda g: g.free)
        if smallest.free < minimum.total_bytes:
            tried.append(f"{node.name} with {tp} GPU(s): {smallest.label} has {gib(max(smallest.free, 0))} free")
            continue
        total = min(g.total for g in gpus)
        utilization = model.gpu_memory_utilization or min(MAX_GPU_UTILIZATION, round(smallest.free / total, 2))
        budget = int(utilization * total)
        if budget > smallest.free:
            tried.append(f"{node.name}: gpu_memory_utilization {utilization} needs {gib(budget)} per GPU, "
                         f"{smallest.label} has {gib(max(smallest.free, 0))} free")
            continue
        kv_room = budget - minimum.weights_bytes - minimum.compute_bytes - minimum.runtime_bytes
        sequences = kv_room * tp // (shape.kv_bytes_per_token * model.context_length)
        if sequences < 1:
            tried.append(f"{node.name}: gpu_memory_utilization {utilization} leaves no room for one full sequence")
            continue
        plan.tensor_parallel_size = tp
        plan.gpu_memory_utilization = utilization
        plan.max_num_seqs = min(model.max_num_seqs or DEFAULT_MAX_NUM_SEQS, sequences)
        plan.estimate = vllm_estimate(shape, model.context_length, plan.max_num_seqs, tp)
        for g in gpus:
            node.take(g, budget)
        return Placement(node=node.name, device="gpu", gpus=sorted(g.index for g in gpus), gpu_bytes=budget,
                         ram_bytes=minimum.runtime_bytes)
    return None


def _devices(nodes: list[Node], inventories: list[Inventory]) -> list[DeviceUse]:
    out = []
    for node, inv in zip(nodes, inventories):
        usable = inv.memory_available_bytes - RAM_RESERVE_BYTES
        out.append(DeviceUse(node=node.name, device="ram", total_bytes=node.ram_total,
                             planned_bytes=usable - node.ram_free, free_after_bytes=max(node.ram_free, 0)))
        info_of = {g.index: g for g in inv.gpus}
        for gpu in node.gpus:
            info = info_of[gpu.index]
            usable = int(info.memory_free_bytes - info.memory_total_bytes * GPU_RESERVE_FRACTION)
            out.append(DeviceUse(node=node.name, device=gpu.label, total_bytes=gpu.total,
                                 planned_bytes=usable - gpu.free, free_after_bytes=max(gpu.free, 0)))
    return out
