"""How each engine kind is started: the command line of one replica.

llama.cpp runs llama-cpp-python's OpenAI-compatible server; vLLM runs `vllm serve`
(its OpenAI server, documented CLI flags only); a remote model has no local process.
"""

from __future__ import annotations

import os
import sys

import msgspec

from appliance.config import ModelConfig


class EngineCommand(msgspec.Struct, kw_only=True):
    argv: list[str]
    base_url: str  # OpenAI API root the gateway talks to
    health_url: str  # answers 200 once the model is loaded


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def llamacpp_command(model: ModelConfig, host: str, port: int, api_key: str) -> EngineCommand:
    argv = [
        sys.executable, "-m", "services.engines.llamacpp_server",
        "--model", model.path,
        "--model_alias", model.name,
        "--host", host,
        "--port", str(port),
        f"--api_key={api_key}",  # one token, whatever the key starts with
        "--n_ctx", str(model.context_length),
        "--n_threads", str(model.threads or default_threads()),
        "--n_gpu_layers", str(model.gpu_layers or 0),  # the plan fills it in; unplanned means CPU
        "--embedding", "true" if model.embeddings else "false",
        # Queue concurrent requests instead of cutting off the stream being generated.
        "--interrupt_requests", "false",
        # The server's default keeps the logits of every token of the context (context x
        # vocabulary x 4 bytes, twice: 0.8 GiB for the default model at 2048 tokens), which
        # only `logprobs` need: the profile asks for them per model.
        "--logits_all", "true" if model.logprobs else "false",
        *model.extra_args,
    ]
    return EngineCommand(argv=argv, base_url=f"http://{host}:{port}/v1", health_url=f"http://{host}:{port}/health")


def vllm_command(model: ModelConfig, host: str, port: int, api_key: str) -> EngineCommand:
    argv = [
        "vllm", "serve", model.path,
        "--served-model-name", model.name,
        "--host", host,
        "--port", str(port),
        f"--api-key={api_key}",
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
    return EngineCommand(argv=argv, base_url=f"http://{host}:{port}/v1", health_url=f"http://{host}:{port}/health")


BUILDERS = {"llamacpp": llamacpp_command, "vllm": vllm_command}


def engine_command(model: ModelConfig, host: str, port: int, api_key: str) -> EngineCommand:
    if model.engine not in BUILDERS:
        raise ValueError(f"engine {model.engine!r} has no local process")
    return BUILDERS[model.engine](model, host, port, api_key)
