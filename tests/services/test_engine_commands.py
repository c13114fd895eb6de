"""Engine command lines, parsed by the engines' own argument parsers where they are installed."""

from __future__ import annotations

from appliance.config import ModelConfig
from services.engines.commands import engine_command


def test_llamacpp_command_survives_a_key_that_looks_like_a_flag():
    from llama_cpp.server.cli import add_args_from_model
    from llama_cpp.server.settings import Settings
    import argparse

    model = ModelConfig(name="m", engine="llamacpp", path="/models/m.gguf", context_length=4096, threads=3, embeddings=True,
                        extra_args=["--n_batch", "256"])
    cmd = engine_command(model, "127.0.0.1", 41000, "-starts-with-a-dash")
    parser = argparse.ArgumentParser()
    add_args_from_model(parser, Settings)
    args = parser.parse_args(cmd.argv[3:])
    assert args.api_key == "-starts-with-a-dash"
    assert (args.model, args.model_alias, args.port, args.n_ctx, args.n_threads) == ("/models/m.gguf", "m", 41000, 4096, 3)
    assert args.embedding is True and args.interrupt_requests is False and args.n_batch == 256
    assert args.logits_all is False and args.n_gpu_layers == 0  # unplanned: CPU
    assert cmd.base_url == "http://127.0.0.1:41000/v1" and cmd.health_url == "http://127.0.0.1:41000/health"


def test_vllm_command_uses_documented_flags():
    # As the planner fills it in (appliance.planning.plan_model.planned_model).
    model = ModelConfig(name="big", engine="vllm", path="/models/big", context_length=8192, gpus=2,
                        gpu_memory_utilization=0.85, max_num_seqs=48, extra_args=["--enforce-eager"])
    cmd = engine_command(model, "127.0.0.1", 42000, "k")
    assert cmd.argv[:3] == ["vllm", "serve", "/models/big"]
    joined = " ".join(cmd.argv)
    for flag in ("--served-model-name big", "--port 42000", "--api-key=k", "--max-model-len 8192", "--tensor-parallel-size 2",
                 "--gpu-memory-utilization 0.85", "--max-num-seqs 48"):
        assert flag in joined
    assert cmd.argv[-1] == "--enforce-eager"  # the profile's extra_args come last and win
    assert cmd.health_url == "http://127.0.0.1:42000/health"
