"""One engine replica as a supervised child process, bound to loopback with its own key
(passed in its environment, never on its command line): ready once it answered a warm-up
request, its state reported to the gateway."""

from __future__ import annotations

import os
import secrets
import signal
import socket
from pathlib import Path

from appliance.config import ModelConfig
from appliance.home import log_path
from appliance.planning.plan_model import ModelPlan, Placement, planned_model
from services.engines.commands import engine_command
from services.engines.process import ManagedProcess
from services.engines.status import StatusReporter
from services.engines.warmup import warm_up_call
from services.gateway.runtime import ReplicaEndpoint

ENGINE_HOST = "127.0.0.1"
# Named in exit meanings, e.g. SIGILL: "this llama.cpp build uses CPU instructions this machine cannot run".
PROGRAMS = {"llamacpp": "this llama.cpp build", "vllm": "this vLLM build"}
# What an engine gets when the supervisor dies without stopping it. llama-server can miss a
# SIGTERM (its handler takes a lock the interrupted thread may hold, and one that lands just
# before its task loop starts is forgotten) and holds nothing to save; vLLM stops its own
# engine-core processes on SIGTERM, which SIGKILL would orphan.
DEATH_SIGNALS = {"llamacpp": signal.SIGKILL, "vllm": signal.SIGTERM}


def free_port(host: str = ENGINE_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def engine_slots(engine_model: ModelConfig) -> int | None:
    """Sequences the engine runs at once: llama.cpp's --parallel (services/engines/commands.py),
    vLLM's --max-num-seqs where set (else vLLM's own default, which the gateway does not cap)."""
    return engine_model.max_num_seqs or (1 if engine_model.engine == "llamacpp" else None)


def replica_process(model: ModelConfig, planned: ModelPlan, placement: Placement, index: int,
                    home: Path) -> tuple[ManagedProcess, ReplicaEndpoint]:
    """The (not yet started) process of replica `index` and the endpoint the gateway uses."""
    key = secrets.token_hex(24)
    engine_model = planned_model(model, planned, placement)
    cmd = engine_command(engine_model, ENGINE_HOST, free_port(), key)
    child = ManagedProcess(
        f"engine {model.name}#{index}",
        cmd.argv,
        log_path=log_path(home, f"engine-{model.name}-{index}"),
        health_url=cmd.health_url,
        health_headers={"Authorization": f"Bearer {key}"},
        startup_timeout_s=model.startup_timeout_s,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, placement.gpus)), **cmd.env},  # the key: never argv
        program=PROGRAMS[model.engine],
        warm_up=warm_up_call(model, cmd.base_url, key),
        max_crashes=model.max_crashes,
        crash_window_s=model.crash_window_s,
        restart_at_once=True,
        death_signal=DEATH_SIGNALS[model.engine],
        on_change=StatusReporter(home, model.name, index, cmd.base_url, placement.gpus, placement.gpu_bytes),
    )
    return child, ReplicaEndpoint(base_url=cmd.base_url, health_url=cmd.health_url, api_key=key,
                                  slots=engine_slots(engine_model))
