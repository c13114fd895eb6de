"""The fit estimator against the real engine, and the planner against recorded machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import psutil
import pytest

from appliance.config import ModelConfig, load_profile, parse_profile
from appliance.errors import PlanError
from appliance.planning.estimate import GiB, MiB, llamacpp_estimate, model_shape
from appliance.planning.inventory import read_inventory
from appliance.planning.planner import LLAMACPP_SLOTS, choose_profile, make_plan
from tests.conftest import running_engine

INVENTORIES = Path(__file__).parents[1] / "inventories"
SLOTS = LLAMACPP_SLOTS[0]


def machine(name: str):
    return read_inventory(INVENTORIES / f"{name}.json")


@pytest.fixture(scope="module")
def default_model() -> ModelConfig:
    return load_profile("edge-cpu").models[0]


def test_gguf_shape_of_the_default_model(default_model):
    shape = model_shape(default_model.path)
    assert (shape.layers, shape.embedding, shape.vocabulary) == (30, 576, 49152)
    assert shape.kv_bytes_per_token == 30 * 3 * (64 + 64) * 2  # 3 KV heads of 64, K and V, f16
    assert shape.weights_bytes == 96_576_768 and shape.trained_context == 8192


@pytest.mark.stack
def test_estimate_is_within_15_percent_of_the_engines_real_memory(default_model, tmp_path):
    """The engine as the appliance runs it (the plan's slots), its context mostly filled by one prompt."""
    model = msgspec.structs.replace(default_model, gpu_layers=0, max_num_seqs=SLOTS)
    with running_engine(model, tmp_path) as (command, proc):
        prompt = "Summarise this: " + "the cat sat on the mat. " * (model.context_length * 7 // 8 // 7)
        answer = httpx.post(command.base_url + "/chat/completions", timeout=300, headers={"Authorization": "Bearer test-key"},
                            json={"model": model.name, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] > model.context_length // 2
        rss = psutil.Process(proc.pid).memory_info().rss
    estimate = llamacpp_estimate(model_shape(model.path), model.context_length, SLOTS).total_bytes
    assert abs(estimate - rss) / rss <= 0.15, f"estimate {estimate / MiB:.0f} MiB, engine {rss / MiB:.0f} MiB"


def test_cpu_machine_plans_the_default_model_on_the_cpu():
    plan = make_plan(load_profile("edge-cpu"), [machine("edge-cpu-here")])
    mp = plan.models[0]
    assert mp.gpu_layers == 0 and [p.device for p in mp.replicas] == ["cpu"]
    ram = next(d for d in plan.devices if d.device == "ram")
    assert ram.planned_bytes == mp.estimate.total_bytes


def test_replicas_on_one_node_share_the_weights(default_model):
    profile = load_profile("edge-cpu")
    profile.models[0].replicas = 3
    mp = make_plan(profile, [machine("edge-cpu-here")]).models[0]
    first, *others = mp.replicas
    assert first.ram_bytes - others[0].ram_bytes == mp.estimate.weights_bytes


def test_gpu_machine_offloads_every_layer_and_spreads_replicas():
    profile = load_profile("multi-gpu")
    plan = make_plan(profile, [machine("server-4x-a100-80gb")])
    mp = plan.models[0]
    assert mp.gpu_layers == -1
    assert sorted(p.gpus[0] for p in mp.replicas) == [0, 1]


def test_partial_offload_when_the_gpu_is_too_small(tmp_path):
    """A 14 GB T4 with 12k of context for a model whose layers do not all fit: some layers go to the GPU."""
    inventory = machine("node-1x-t4")
    gpu = inventory.gpus[0]
    gpu.memory_free_bytes = gpu.memory_total_bytes = int(1.0 * GiB)  # a small GPU: 1 GiB
    profile = load_profile("edge-cpu")
    profile.models[0].context_length = 8192
    mp = make_plan(profile, [inventory]).models[0]
    assert 0 < mp.gpu_layers < mp.layers
    assert any("partial offload" in note for note in mp.notes)


def test_a_model_that_does_not_fit_is_refused_with_the_numbers():
    inventory = machine("edge-cpu-here")
    inventory.memory_available_bytes = int(1.2 * GiB)  # 1 GiB stays for the system: ~200 MiB left
    with pytest.raises(PlanError) as error:
        make_plan(load_profile("edge-cpu"), [inventory])
    message = error.value.message
    assert "smollm2-135m-instruct" in message and "does not fit" in message
    assert "weights" in message and "KV cache" in message and "RAM" in message


def hf_model(root: Path, weights_gib: float) -> Path:
    """An HF-format directory: Qwen2.5-7B's published config.json, weights as a sparse file of that size."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "torch_dtype": "bfloat16", "vocab_size": 152064,
    }))
    with open(root / "model.safetensors", "wb") as f:
        f.truncate(int(weights_gib * GiB))
    return root


def vllm_profile(path: Path, **model) -> object:
    return parse_profile({"name": "t", "models": [{"name": "big", "engine": "vllm", "path": str(path), **model}]},
                         source="test", base_dir=path.parent)


def test_vllm_picks_the_smallest_tensor_parallel_size_and_sizes_its_cache(tmp_path):
    profile = vllm_profile(hf_model(tmp_path / "qwen", 15.2), context_length=16384)
    mp = make_plan(profile, [machine("workstation-1x-l4")]).models[0]
    assert mp.tensor_parallel_size == 1 and mp.replicas[0].gpus == [0]
    assert 0 < mp.gpu_memory_utilization <= 0.90 and mp.max_model_len == 16384
    kv_per_token = 2 * 28 * 4 * 128 * 2
    assert mp.max_num_seqs >= 1 and mp.max_num_seqs * 16384 * kv_per_token <= mp.replicas[0].gpu_bytes

    big = vllm_profile(hf_model(tmp_path / "big", 130), context_length=8192)
    mp = make_plan(big, [machine("server-4x-a100-80gb")]).models[0]
    assert mp.tensor_parallel_size == 2 and len(mp.replicas[0].gpus) == 2


def test_vllm_model_too_big_for_the_machine_is_refused(tmp_path):
    profile = vllm_profile(hf_model(tmp_path / "huge", 40), context_length=8192)
    with pytest.raises(PlanError, match="does not fit on any GPU"):
        make_plan(profile, [machine("workstation-1x-l4")])


def test_mig_gpus_are_left_out_with_a_note():
    plan = make_plan(load_profile("single-gpu"), [machine("server-1x-h100-80gb-mig")])
    mp = plan.models[0]
    assert mp.gpu_layers == 0 and any("MIG" in note for note in mp.notes)


def test_cluster_gives_each_replica_its_own_gpu():
    nodes = [machine("server-4x-a100-80gb"), machine("node-1x-t4"), machine("workstation-1x-l4")]
    plan = make_plan(load_profile("small-cluster"), nodes, whole_gpus=True)
    used = [(p.node, g) for p in plan.models[0].replicas for g in p.gpus]
    assert len(used) == len(set(used)) == 3
    assert len({node for node, _ in used}) == 3  # spread over the nodes first


def test_auto_profile_follows_the_hardware():
    assert choose_profile([machine("edge-cpu-here")]) == "edge-cpu"
    assert choose_profile([machine("workstation-1x-l4")]) == "single-gpu"
    assert choose_profile([machine("server-8x-h100-80gb")]) == "multi-gpu"
    assert choose_profile([machine("edge-cpu-here"), machine("node-1x-t4")]) == "small-cluster"


def test_plan_command_prints_json_for_a_saved_inventory():
    done = subprocess.run([str(Path(sys.executable).parent / "appliance"), "plan", "--json", "--inventory",
                           str(INVENTORIES / "workstation-1x-l4.json")], capture_output=True, text=True,
                          env={**os.environ})
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["profile"] == "single-gpu" and plan["models"][0]["gpu_layers"] == -1


def test_every_slot_has_its_kv_cache_and_slots_give_way_to_memory(default_model):
    """The plan's slots each hold context_length tokens of KV cache; where the most slots do
    not fit the machine, fewer do, and the plan says so."""
    shape = model_shape(default_model.path)
    plan = make_plan(load_profile("edge-cpu"), [machine("edge-cpu-here")]).models[0]
    assert plan.max_num_seqs == SLOTS
    assert plan.estimate.kv_cache_bytes == SLOTS * default_model.context_length * shape.kv_bytes_per_token
    assert plan.replicas[0].threads == machine("edge-cpu-here").cpu.physical_cores
    def profile(**settings):
        return msgspec.structs.replace(load_profile("edge-cpu"), models=[msgspec.structs.replace(default_model, **settings)])

    plan = make_plan(profile(context_length=131072), [machine("edge-cpu-here")]).models[0]
    assert plan.max_num_seqs == 4 and plan.estimate.kv_cache_bytes == 4 * 131072 * shape.kv_bytes_per_token
    assert "4 parallel slots: 8 do not fit" in plan.notes
    with pytest.raises(PlanError, match="8 parallel sequences of 131072 tokens"):  # the profile's own number is kept
        make_plan(profile(context_length=131072, max_num_seqs=8), [machine("edge-cpu-here")])
