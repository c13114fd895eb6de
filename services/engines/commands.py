"""How each engine kind is started: the command line of one replica.

llama.cpp runs its own OpenAI-compatible server, `llama-server` (continuous batching over
parallel slots), built portable by installer/llama_build.py and installed with the
appliance-llama-server package; vLLM runs `vllm serve` (its OpenAI server, documented
CLI flags only); a remote model has no local process.

The engine's API key is never on its command line (any local user can read that with `ps`):
the engine reads it from its environment, which only its own user and root can read
(/proc/PID/environ is mode 0400). llama-server reads LLAMA_API_KEY (llama.cpp
common/arg.cpp, `--api-key`'s `set_env`); vLLM reads VLLM_API_KEY (its documented variable).
"""

from __future__ import annotations

import os
import sys

import msgspec

from appliance.config import ModelConfig


# The variable each engine reads its API key from.
KEY_ENV = {"llamacpp": "LLAMA_API_KEY", "vllm": "VLLM_API_KEY"}


class EngineCommand(msgspec.Struct, kw_only=True):
    argv: list[str]  # holds no secret
    base_url: str  # OpenAI API root the gateway talks to
    health_url: str  # answers 200 once the model is loaded, and while the engine is busy
    key_env: str  # the variable the engine reads its API key from
    api_key: str

    @property
    def env(self) -> dict[str, str]:
        """What to add to the engine's environment: its key."""
        return {self.key_env: self.api_key}


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def llamacpp_command(model: ModelConfig, host: str, port: int, api_key: str) -> EngineCommand:
    slots = model.max_num_seqs or 1  # the planner fills it in (appliance/planning/planner.py)
    argv = [
        sys.executable, "-m", "services.engines.llama_server",  # execs llama-server
        "--model", model.path,
        "--alias", model.name,
        "--host", host,
        "--port", str(port),
        # Each slot serves one sequence of context_length tokens (the planner counts every
        # slot's KV cache); a shared pool would let one long prompt starve the others.
        "--parallel", str(slots),
        "--ctx-size", str(model.context_length * slots),
        "--no-kv-unified",
        "--threads", str(model.threads or default_threads()),
        "--n-gpu-layers", str(model.gpu_layers or 0),  # the plan fills it in; unplanned means CPU
        # The plan sizes memory itself: no automatic fitting, no RAM prompt cache beyond it.
        "--fit", "off",
        "--cache-ram", "0",
        "--jinja",  # chat templates with tools
        "--no-webui",
        "--no-slots",  # /slots would show prompts
        *(["--embeddings", "--pooling", "mean"] if model.embeddings else []),
        *model.extra_args,
    ]
    return EngineCommand(argv=argv, base_url=f"http://{host}:{port}/v1", health_url=f"http://{host}:{port}/health",
                         key_env=KEY_ENV["llamacpp"], api_key=api_key)


def vllm_command(model: ModelConfig, host: str, port: int, api_key: str) -> EngineCommand:
    argv = [
        "vllm", "serve", model.path,
        "--served-model-name", model.name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(model.context_length),
    ]
    # Filled in by the planner (appliance/planning/planner.py); vLLM's defaults where unplanned.
    if model.gpus:
        argv += ["--tensor-parallel-size", str(model.gpus)]
    if model.gpu_memory_utilization:
        argv += ["--gpu-memory-utilization", f"{model.gpu_memory_utilization:g}"]
    if model.max_num_seqs:
        argv += ["--max-num-seqs", str(model.max_num_seqs)]
    argv += model.extra_args
    return EngineCommand(argv=argv, base_url=f"http://{host}:{port}/v1", health_url=f"http://{host}:{port}/health",
                         key_env=KEY_ENV["vllm"], api_key=api_key)


BUILDERS = {"llamacpp": llamacpp_command, "vllm": vllm_command}


def engine_command(model: ModelConfig, host: str, port: int, api_key: str) -> EngineCommand:
    if model.engine not in BUILDERS:
        raise ValueError(f"engine {model.engine!r} has no local process")
    return BUILDERS[model.engine](model, host, port, api_key)
