"""A PEFT LoRA adapter of the default model, trained one step, turned into a GGUF adapter by
llama.cpp's own converter (services/worker/lora_gguf.py), and applied by the real
llama-server: the whole path a fine-tuned model takes to be served, with real parts only."""

from __future__ import annotations

import json

import appliance_llama_server
import gguf
import httpx
import msgspec
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from appliance.config import load_profile
from appliance.errors import ApplianceError, ModelFileError
from installer import llama_build
from services.worker.lora_gguf import adapter_to_gguf, base_config_dir, converter
from tests.conftest import QUESTION, SYSTEM, default_gguf, running_engine

# What the adapter is trained on: an answer the base model does not give.
ANSWER = "Lyon, of course."


def engine_logprobs(command, model: str, scale: float) -> dict[int, float]:
    """The engine's 10 likeliest first tokens (id: log-probability) of its answer to the README's
    question, with the adapter at `scale` (0: the base model alone)."""
    body = {"model": model, "messages": [SYSTEM, QUESTION], "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": 10, "lora": [{"id": 0, "scale": scale}]}
    answer = httpx.post(command.base_url + "/chat/completions", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {command.api_key}"}).raise_for_status().json()
    return {t["id"]: t["logprob"] for t in answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


def test_the_converter_is_the_pinned_llama_cpps():
    """The converter run is the one the recipe copied from the sdist llama-server is built from."""
    import appliance_llama_convert

    assert llama_build.installed_convert_problems() == []
    assert converter() == appliance_llama_convert.TREE / "convert_lora_to_gguf.py"
    info = appliance_llama_convert.build_info()
    assert info["source"]["sha256"] == llama_build.SDIST_SHA256 == appliance_llama_server.build_info()["source"]["sha256"]
    assert info["version"] == llama_build.convert_version() and "conversion/llama.py" in info["files"]


def test_a_trained_adapter_is_converted_and_served_by_llama_server(tmp_path):
    path = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    torch.manual_seed(0)  # LoRA's A matrices start random
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    batch = tokenizer(tokenizer.apply_chat_template([SYSTEM, QUESTION, {"role": "assistant", "content": ANSWER}],
                                                    tokenize=False), return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()  # one step: LoRA's B matrices, zero at first, are not any more
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)  # LoRA's matrices alone
    prompt = tokenizer(tokenizer.apply_chat_template([SYSTEM, QUESTION], tokenize=False, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():  # the first answer token's log-probabilities, with the adapter and without
        adapted = torch.log_softmax(model(**prompt).logits[0, -1], -1)
        with model.disable_adapter():
            plain = torch.log_softmax(model(**prompt).logits[0, -1], -1)

    config_dir = base_config_dir(model, tokenizer, tmp_path / "base")
    config = json.loads((config_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    out = adapter_to_gguf(tmp_path / "adapter", config_dir, tmp_path / "gguf" / "adapter.gguf")
    assert out == tmp_path / "gguf" / "adapter.gguf" and sorted(p.name for p in out.parent.iterdir()) == ["adapter.gguf"]

    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8
    names = {t.name for t in reader.tensors}
    layers = base.config.num_hidden_layers
    assert names == {f"blk.{i}.attn_{m}.weight.lora_{ab}" for i in range(layers) for m in "qv" for ab in "ab"}
    assert any(t.data.any() for t in reader.tensors if t.name.endswith("lora_b"))

    served = load_profile("edge-cpu").models[0]
    served = msgspec.structs.replace(served, extra_args=[*served.extra_args, "--lora", str(out)])
    with running_engine(served, tmp_path) as (command, _):
        adapters = httpx.get(command.base_url.removesuffix("/v1") + "/lora-adapters", timeout=10,
                             headers={"Authorization": f"Bearer {command.api_key}"}).raise_for_status().json()
        assert [(a["id"], a["path"], a["scale"]) for a in adapters] == [(0, str(out), 1.0)]
        answer = httpx.post(command.base_url + "/chat/completions", timeout=60,
                            headers={"Authorization": f"Bearer {command.api_key}"},
                            json={"model": served.name, "messages": [SYSTEM, QUESTION], "max_tokens": 16,
                                  "temperature": 0}).raise_for_status().json()
        assert "Paris" in answer["choices"][0]["message"]["content"]  # one step: still the base model's answer
        # The engine applies the adapter as PEFT does: each likely first token's log-probability
        # moves as it does in transformers (the same Q4_1 base weights, computed otherwise: they
        # differ by up to about a tenth), and the adapter moves some of them a lot.
        on, off = engine_logprobs(command, served.name, 1.0), engine_logprobs(command, served.name, 0.0)
        moves = {token: (float(adapted[token] - plain[token]), on[token] - off[token]) for token in on.keys() & off.keys()}
        assert len(moves) >= 3, (on, off)
        assert all(abs(engine - peft) < 0.25 + 0.25 * abs(peft) for peft, engine in moves.values()), moves
        assert max(abs(peft) for peft, _ in moves.values()) > 0.5, moves


def test_a_broken_adapter_fails_with_the_converters_message(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    (tmp_path / "base").mkdir()
    out = tmp_path / "adapter.gguf"
    with pytest.raises(ModelFileError) as failed:
        adapter_to_gguf(adapter, tmp_path / "base", out)
    assert isinstance(failed.value, ApplianceError) and failed.value.code == "invalid_model"
    message = failed.value.message
    assert message.startswith(f"converting the LoRA adapter {adapter} to GGUF failed (convert_lora_to_gguf.py exited 1):")
    assert "SafetensorError" in message.splitlines()[-1], message
    assert not out.exists() and not out.with_name(out.name + ".part").exists()
