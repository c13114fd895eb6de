"""Room for a fine-tuning job beside serving, on GPUs as NVML reported them on real
servers (the recorded probes in tests/inventories): a job takes only what serving leaves,
counting the memory planned for replicas that are starting, and otherwise waits, saying why.
A job that waits is queued again and then runs (the state database, for real)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from appliance import jobs
from appliance.audit import Actor
from appliance.db import open_db
from appliance.finetune import FineTune
from appliance.planning.inventory import read_inventory
from services.engines.status import ReplicaStatus
from services.worker.gpu_room import CUDA_CONTEXT_BYTES, MARGIN, choose_gpu, reserved_by_serving, training_bytes
from tests.appliance.test_probe import INVENTORIES

GIB = 1 << 30
CARD = {"parameters": 134_515_008, "layers": 30, "embedding_length": 576}  # the default model's GGUF facts


def replica(state: str, gpus: list[int], gpu_bytes: int, n: int = 0) -> ReplicaStatus:
    return ReplicaStatus(model="m", replica=n, base_url=f"http://127.0.0.1:{9000 + n}/v1", state=state, gpus=gpus,
                         gpu_bytes=gpu_bytes)


def test_the_estimate_counts_the_float32_base_the_activations_and_the_context():
    small = training_bytes(CARD, batch_size=1, sequence_length=128)
    assert small > CARD["parameters"] * 4 + CUDA_CONTEXT_BYTES
    assert training_bytes(CARD, batch_size=4, sequence_length=128) > small  # activations grow with the batch
    assert training_bytes({}, 2, 512) == CUDA_CONTEXT_BYTES  # a card without the facts: the context alone


def test_only_replicas_not_holding_their_memory_reserve_it():
    statuses = [replica("ready", [0], 40 * GIB, 0), replica("starting", [1], 30 * GIB, 1),
                replica("restarting", [1, 2], 10 * GIB, 2), replica("failed", [3], 5 * GIB, 3)]
    assert reserved_by_serving(statuses) == {1: 40 * GIB, 2: 10 * GIB, 3: 5 * GIB}


def test_a_job_takes_the_gpu_with_most_room_beside_serving():
    gpus = read_inventory(INVENTORIES / "server-8x-h100-80gb.json").gpus
    busy = [msgspec.structs.replace(g, memory_free_bytes=g.memory_free_bytes - (70 - g.index) * GIB) for g in gpus]
    index, why = choose_gpu(4 * GIB, busy, {})
    assert (index, why) == (7, "")  # the least used
    # GPU 7's room is planned for an engine replica that is starting: the job goes elsewhere.
    index, _ = choose_gpu(4 * GIB, busy, {7: 20 * GIB})
    assert index == 6


def test_a_job_that_does_not_fit_waits_and_says_why():
    [gpu] = read_inventory(INVENTORIES / "server-1x-h100-80gb.json").gpus
    room = gpu.memory_free_bytes - 30 * GIB - int(gpu.memory_total_bytes * MARGIN)
    index, why = choose_gpu(room + 1, [gpu], {gpu.index: 30 * GIB})
    assert index is None
    assert why.startswith("waiting for GPU memory: the job needs about ") and "GPU 0" in why
    assert "planned for engine replicas that are starting" in why
    assert choose_gpu(room, [gpu], {gpu.index: 30 * GIB}) == (0, "")
    assert choose_gpu(GIB, [], {}) == (None, "no GPU could be read (NVML)")


def test_a_waiting_job_is_queued_again_with_its_reason_and_runs_later(tmp_path: Path):
    db = open_db(tmp_path / "state.db")
    actor = Actor("key_1", "ml-engineer", "developer", "req_1")
    job = jobs.create(db, "finetune", FineTune(base="m", dataset="d"), actor)
    assert jobs.claim(db, job["id"])["state"] == "running"
    jobs.wait(db, job["id"], "waiting for GPU memory: the job needs about 3 GiB")
    waiting = jobs.get(db, job["id"])
    assert (waiting["state"], waiting["message"]) == ("queued", "waiting for GPU memory: the job needs about 3 GiB")
    assert jobs.log_lines(db, job["id"])[-1]["text"] == waiting["message"]
    assert jobs.claim(db, job["id"])["state"] == "running"  # the worker's next try
