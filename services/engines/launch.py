"""One engine replica as a supervised child process, bound to loopback with its own key."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from appliance.config import ModelConfig
from appliance.home import logs_dir
from installer.plan_model import ModelPlan, Placement, planned_model
from services.engines.commands import engine_command
from services.engines.process import ManagedProcess
from services.gateway.runtime import ReplicaEndpoint

ENGINE_HOST = "127.0.0.1"


def free_port(host: str = ENGINE_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_process(model: ModelConfig, planned: ModelPlan, placement: Placement, index: int,
                    home: Path) -> tuple[ManagedProcess, ReplicaEndpoint]:
    """The (not yet started) process of replica `index` and the endpoint the gateway uses."""
    key = secrets.token_hex(24)
    cmd = engine_command(planned_model(model, planned, placement), ENGINE_HOST, free_port(), key)
    child = ManagedProcess(
        f"engine {model.name}#{index}",
        cmd.argv,
        log_path=logs_dir(home) / f"engine-{model.name}-{index}.log",
        health_url=cmd.health_url,
        health_headers={"Authorization": f"Bearer {key}"},
        startup_timeout_s=model.startup_timeout_s,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, placement.gpus))},
    )
    return child, ReplicaEndpoint(base_url=cmd.base_url, health_url=cmd.health_url, api_key=key)
