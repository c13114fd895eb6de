"""Engine command lines, parsed by the engines' own argument parsers where they are installed."""

from __future__ import annotations

import os
import subprocess

from appliance.config import ModelConfig
from services.engines.commands import engine_command
from tests.conftest import free_port


def test_llama_server_accepts_every_flag_of_the_command(tmp_path):
    """llama-server parses the whole command line (a flag it does not know stops it with
    "invalid argument") and gets as far as loading the model, which is missing here."""
    missing = tmp_path / "missing.gguf"
    model = ModelConfig(name="m", engine="llamacpp", path=str(missing), context_length=4096, threads=3, max_num_seqs=4,
                        embeddings=True, extra_args=["--batch-size", "256"])
    cmd = engine_command(model, "127.0.0.1", free_port(), "-starts-with-a-dash")
    argv = cmd.argv
    value = {flag: argv[argv.index(flag) + 1] for flag in ("--parallel", "--ctx-size", "--threads", "--n-gpu-layers")}
    # Four slots of 4096 tokens each, unplanned means CPU.
    assert value == {"--parallel": "4", "--ctx-size": "16384", "--threads": "3", "--n-gpu-layers": "0"}
    # The key is in no argument (`ps` shows those to every local user): the engine reads it from its environment.
    assert cmd.env == {"LLAMA_API_KEY": "-starts-with-a-dash"} and not any("api-key" in a or cmd.api_key in a for a in argv)
    assert "--no-kv-unified" in argv and argv[-2:] == ["--batch-size", "256"]  # extra_args last: they win
    assert cmd.base_url.endswith("/v1") and cmd.health_url.endswith("/health")
    run = subprocess.run(argv, env={**os.environ, **cmd.env}, capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert "invalid argument" not in output and f"failed to load model '{missing}'" in output, output


def test_vllm_command_uses_documented_flags():
    # As the planner fills it in (appliance.planning.plan_model.planned_model).
    model = ModelConfig(name="big", engine="vllm", path="/models/big", context_length=8192, gpus=2,
                        gpu_memory_utilization=0.85, max_num_seqs=48, extra_args=["--enforce-eager"])
    cmd = engine_command(model, "127.0.0.1", 42000, "k")
    assert cmd.argv[:3] == ["vllm", "serve", "/models/big"]
    joined = " ".join(cmd.argv)
    for flag in ("--served-model-name big", "--port 42000", "--max-model-len 8192", "--tensor-parallel-size 2",
                 "--gpu-memory-utilization 0.85", "--max-num-seqs 48"):
        assert flag in joined
    # vLLM's documented variable for its key (`--api-key`'s alternative): never on the command line.
    assert cmd.env == {"VLLM_API_KEY": "k"} and "--api-key" not in joined
    assert cmd.argv[-1] == "--enforce-eager"  # the profile's extra_args come last and win
    assert cmd.health_url == "http://127.0.0.1:42000/health"
