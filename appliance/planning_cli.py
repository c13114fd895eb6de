"""`appliance probe` and `appliance plan`: the hardware, and what would run where and whether it fits,
before anything is installed."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec

from appliance.config import load_profile
from appliance.errors import InstallError
from appliance.cli_options import home_option, json_option, profile_option
from appliance.home import resolve_home
from appliance.planning.plan_model import Plan
from appliance.planning.engine_builds import check_engine_builds
from appliance.planning.estimate import gib
from appliance.planning.inventory import GpuInfo, Inventory, encode_inventory, read_inventory
from appliance.planning.probe import probe
from appliance.planning.planner import choose_profile, make_plan


def describe_plan(plan: Plan) -> str:
    lines = [f"profile {plan.profile} on {', '.join(plan.nodes)}", ""]
    for mp in plan.models:
        lines.append(f"{mp.name} ({mp.engine})")
        if mp.estimate:
            e = mp.estimate
            lines.append(f"  memory per replica: {gib(e.total_bytes)} = weights {gib(e.weights_bytes)} + KV cache "
                         f"{gib(e.kv_cache_bytes)} + compute {gib(e.compute_bytes)} + runtime {gib(e.runtime_bytes)} "
                         f"({e.basis})")
        if mp.engine == "llamacpp":
            layers = {-1: f"all {mp.layers} layers on the GPU", 0: "CPU only"}.get(mp.gpu_layers, f"{mp.gpu_layers} of {mp.layers} layers on the GPU")
            lines.append(f"  {mp.max_num_seqs} parallel slots of {mp.context_length} tokens, {layers}")
        if mp.engine == "vllm":
            lines.append(f"  tensor_parallel_size {mp.tensor_parallel_size}, gpu_memory_utilization "
                         f"{mp.gpu_memory_utilization}, max_model_len {mp.max_model_len}, max_num_seqs {mp.max_num_seqs}")
        for i, p in enumerate(mp.replicas, 1):
            where = "CPU" if p.device == "cpu" else "GPU " + ",".join(map(str, p.gpus)) + f" ({gib(p.gpu_bytes)} each)"
            threads = f", {p.threads} threads" if p.threads else ""
            lines.append(f"  replica {i}: {p.node}, {where}, RAM {gib(p.ram_bytes)}{threads}")
        lines += [f"  note: {note}" for note in mp.notes]
    lines += ["", "left free:"]
    lines += [f"  {d.node} {d.device}: {gib(d.free_after_bytes)} of {gib(d.total_bytes)} (planned {gib(d.planned_bytes)})"
              for d in plan.devices]
    if plan.disk_free_bytes is not None:
        lines.append(f"  disk for model files: {gib(plan.disk_needed_bytes)} needed, {gib(plan.disk_free_bytes)} free")
    return "\n".join(lines)


@click.command("plan")
@profile_option("auto")
@click.option("--inventory", "inventories", multiple=True, type=click.Path(dir_okay=False),
              help="Plan for this inventory (`appliance probe --json`) instead of probing this machine; once per node.")
@home_option("Data directory whose disk is measured when probing this machine. Default: ./var")
@json_option("Print the plan as JSON.")
def plan_command(profile_name: str, inventories: tuple[str, ...], home: str | None, as_json: bool) -> None:
    """Estimate each model's memory from its files and place it on the hardware.

    Says which engine, which GPUs, the tensor-parallel size, llama.cpp GPU layers (all,
    some or none), vLLM gpu_memory_utilization, max_model_len and max_num_seqs, and what
    is left free. A model that cannot fit is refused with the numbers that show why
    (exit status 1). Nothing is downloaded: sizes come from the model files alone.
    """
    machines = [read_inventory(Path(p)) for p in inventories] or [probe(resolve_home(home))]
    name = choose_profile(machines) if profile_name == "auto" else profile_name
    profile = load_profile(name)
    plan = make_plan(profile, machines, whole_gpus=name == "small-cluster" or len(machines) > 1)
    if not inventories:  # planning for this machine: its engine builds must run the plan
        check_engine_builds(plan, machines[0])
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(plan), indent=2))
    else:
        click.echo(describe_plan(plan))

def describe_inventory(inventory: Inventory) -> str:
    """The short human report of `appliance probe`."""
    cpu, nvml = inventory.cpu, inventory.nvml
    lines = [
        f"Host     {inventory.hostname}, probed {inventory.probed_at}",
        f"CPU      {cpu.model}: {cpu.physical_cores} physical / {cpu.logical_cores} logical cores, "
        f"AVX2 {_yes_no(cpu.avx2)}, AVX-512 {_yes_no(cpu.avx512)}",
    ]
    if cpu.flags:
        lines.append(f"         flags: {' '.join(cpu.flags)}")
    lines += [
        f"RAM      {gib(inventory.memory_total_bytes)} total, {gib(inventory.memory_available_bytes)} available",
        f"Disk     {gib(inventory.disk.free_bytes)} free of {gib(inventory.disk.total_bytes)} at {inventory.disk.path}",
    ]
    if nvml.available:
        lines.append(f"NVIDIA   driver {nvml.driver_version or 'unknown'}, CUDA {nvml.cuda_version or 'unknown'}")
    for gpu in inventory.gpus:
        lines.append(f"GPU {gpu.index:<4} {_describe_gpu(gpu)}")
    if inventory.cpu_only:
        why = f"NVML: {nvml.reason}" if not nvml.available else "NVML found no usable GPU"
        lines.append(f"GPUs     none ({why}) — CPU-only machine")
    lines += [f"Warning  {problem}" for problem in nvml.problems]
    return "\n".join(lines)


def _describe_gpu(gpu: GpuInfo) -> str:
    parts = [f"{gib(gpu.memory_free_bytes)} free of {gib(gpu.memory_total_bytes)}"]
    if gpu.compute_capability:
        parts.append(f"compute {gpu.compute_capability}")
    if gpu.mig_mode is not None:
        parts.append(f"MIG {'on' if gpu.mig_mode else 'off'}")
    if gpu.utilization_percent is not None:
        parts.append(f"{gpu.utilization_percent}% busy")
    if gpu.temperature_c is not None:
        parts.append(f"{gpu.temperature_c} °C")
    return f"{gpu.name}: {', '.join(parts)}"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"

@click.command("probe")
@json_option("Print the inventory as JSON instead of the report.")
@home_option("Data directory whose free disk is measured; it need not exist yet. Default: ./var")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False),
    help="Also save the inventory as JSON to FILE, to plan for this machine elsewhere.",
)
def probe_command(as_json: bool, home: str | None, output: str | None) -> None:
    """Report this machine's hardware: GPUs (through NVML), CPU, RAM and free disk.

    GPUs: index, name, UUID, total and free memory, compute capability, MIG mode,
    utilisation, temperature, driver and CUDA versions. Without an NVIDIA driver the
    report says why NVML is unavailable and that the machine is CPU-only. Reads only.
    """
    inventory = probe(resolve_home(home))
    data = encode_inventory(inventory)
    if output:
        try:
            Path(output).write_bytes(data + b"\n")
        except OSError as exc:
            raise InstallError(f"{output}: cannot write the inventory: {exc.strerror}") from None
    click.echo(data.decode() if as_json else describe_inventory(inventory))
