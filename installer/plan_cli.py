"""`appliance plan`: what would run where, and whether it fits, before anything is installed."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec

from appliance.config import load_profile
from appliance.home import HOME_ENV, resolve_home
from installer.plan_model import Plan
from installer.estimate import gib
from installer.planner import choose_profile, make_plan


def describe(plan: Plan) -> str:
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
            lines.append(f"  context {mp.context_length} tokens, {layers}")
        if mp.engine == "vllm":
            lines.append(f"  tensor_parallel_size {mp.tensor_parallel_size}, gpu_memory_utilization "
                         f"{mp.gpu_memory_utilization}, max_model_len {mp.max_model_len}, max_num_seqs {mp.max_num_seqs}")
        for i, p in enumerate(mp.replicas, 1):
            where = "CPU" if p.device == "cpu" else "GPU " + ",".join(map(str, p.gpus)) + f" ({gib(p.gpu_bytes)} each)"
            lines.append(f"  replica {i}: {p.node}, {where}, RAM {gib(p.ram_bytes)}")
        lines += [f"  note: {note}" for note in mp.notes]
    lines += ["", "left free:"]
    lines += [f"  {d.node} {d.device}: {gib(d.free_after_bytes)} of {gib(d.total_bytes)} (planned {gib(d.planned_bytes)})"
              for d in plan.devices]
    if plan.disk_free_bytes is not None:
        lines.append(f"  disk for model files: {gib(plan.disk_needed_bytes)} needed, {gib(plan.disk_free_bytes)} free")
    return "\n".join(lines)


@click.command("plan")
@click.option("--profile", "profile_name", default="auto", show_default=True,
              help="`auto` (chosen from the hardware), a built-in profile name or a profile YAML file.")
@click.option("--inventory", "inventories", multiple=True, type=click.Path(dir_okay=False),
              help="Plan for this inventory (`appliance probe --json`) instead of probing this machine; once per node.")
@click.option("--home", type=click.Path(file_okay=False), envvar=HOME_ENV, show_envvar=True,
              help="Data directory whose disk is measured when probing this machine. Default: ./var")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(profile_name: str, inventories: tuple[str, ...], home: str | None, as_json: bool) -> None:
    """Estimate each model's memory from its files and place it on the hardware.

    Says which engine, which GPUs, the tensor-parallel size, llama.cpp GPU layers (all,
    some or none), vLLM gpu_memory_utilization, max_model_len and max_num_seqs, and what
    is left free. A model that cannot fit is refused with the numbers that show why
    (exit status 1). Nothing is downloaded: sizes come from the model files alone.
    """
    from installer.inventory import read_inventory
    from installer.probe import probe

    machines = [read_inventory(Path(p)) for p in inventories] or [probe(resolve_home(home))]
    name = choose_profile(machines) if profile_name == "auto" else profile_name
    profile = load_profile(name)
    plan = make_plan(profile, machines, whole_gpus=name == "small-cluster" or len(machines) > 1)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(plan), indent=2))
    else:
        click.echo(describe(plan))
