"""The warm-up an engine answers before it counts as ready: one token, or one embedding
for a model that only embeds; asked of the real llama.cpp engine."""

from __future__ import annotations

import json

import gguf
import pytest

from appliance.config import ModelConfig
from services.engines.warmup import embeds_only, warm_up_call
from tests.conftest import DEFAULT_MODEL, default_gguf, engine_tasks, running_engine


def gguf_file(path, arch: str, *, causal: bool | None = None, pooling: gguf.PoolingType | None = None):
    """A GGUF file with metadata only, as llama.cpp's converter writes it for such a model."""
    writer = gguf.GGUFWriter(str(path), arch)
    if causal is not None:
        writer.add_causal_attention(causal)
    if pooling is not None:
        writer.add_pooling_type(pooling)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_directory(path, architecture: str):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return path


@pytest.mark.parametrize("make, embeddings, only", [
    (lambda tmp: gguf_file(tmp / "bert.gguf", "bert", causal=False, pooling=gguf.PoolingType.CLS), True, True),
    (lambda tmp: gguf_file(tmp / "qwen3.gguf", "qwen3", pooling=gguf.PoolingType.LAST), True, True),
    (lambda tmp: gguf_file(tmp / "bert.gguf", "bert", causal=False), False, False),  # not served for embeddings
    (lambda tmp: default_gguf(), True, False),  # the default chat model, `embeddings: true` in edge-cpu
    (lambda tmp: hf_directory(tmp / "bge", "BertModel"), True, True),
    (lambda tmp: hf_directory(tmp / "llama", "LlamaForCausalLM"), True, False),
])
def test_a_model_that_only_embeds_is_told_apart(tmp_path, make, embeddings, only):
    model = ModelConfig(name="m", engine="llamacpp", path=str(make(tmp_path)), embeddings=embeddings)
    assert embeds_only(model) is only


def test_the_real_engine_answers_both_warm_ups(tmp_path):
    model = ModelConfig(name=DEFAULT_MODEL, engine="llamacpp", path=str(default_gguf()), embeddings=True)
    with running_engine(model, tmp_path) as (command, _):
        assert warm_up_call(model, command.base_url, "test-key")(60).startswith("warm-up: one token in ")
        embedder = ModelConfig(name=DEFAULT_MODEL, engine="llamacpp", embeddings=True,
                               path=str(gguf_file(tmp_path / "bert.gguf", "bert", causal=False)))
        assert warm_up_call(embedder, command.base_url, "test-key")(60).startswith("warm-up: one embedding in ")
    log = (tmp_path / "engine.log").read_text()
    assert engine_tasks(log) == (1, 1)
