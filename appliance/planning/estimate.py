"""How much memory a model replica needs, from its files alone (never the network).

GGUF files (llama.cpp): weights are the tensors' sizes; layers, KV heads and head size
come from the GGUF metadata, read by appliance.gguf_meta. HF-format directories
(vLLM): weights are the safetensors files' sizes; the rest comes from config.json.

    total = weights + KV cache (context length x parallel sequences) + compute buffers + runtime

The constants below were measured on the llama.cpp engine on CPU (docs/benchmarks.md,
"Fit estimator"); the GPU ones are the usual CUDA figures and were not measured here.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import InstallError
from appliance.planning.plan_model import MemoryEstimate

MiB = 1024 * 1024
GiB = 1024 * MiB

# llama.cpp's server (n_ubatch = 512, its default; flash attention, so no scores matrix
# over the context), as it logs its buffers:
# - compute: one micro-batch's logits (batch x vocabulary x 4 bytes), a small fixed part,
#   and about 1.2 bytes per embedding dimension per context token of one sequence
#   (counted as 2): allocated in full, though a quiet engine touches less of it;
# - runtime: the server process itself, without buffers.
LLAMACPP_RUNTIME_BYTES = 16 * MiB
LLAMACPP_BATCH = 512
LLAMACPP_COMPUTE_BASE_BYTES = 4 * MiB
LLAMACPP_ACTIVATION_BYTES_PER_DIM = 2
# On a GPU every process also holds a CUDA context, and vLLM reserves activation memory
# for its largest batch and its CUDA graphs.
CUDA_CONTEXT_BYTES = 512 * MiB
VLLM_ACTIVATION_BYTES = 2 * GiB

def gib(n: int) -> str:
    """A size for people: MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


KV_BYTES = {"f16": 2, "bf16": 2, "float16": 2, "bfloat16": 2, "float32": 4, "f32": 4, "fp8": 1, "q8_0": 1}


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs to know about a model, whatever its format."""

    weights_bytes: int
    layers: int
    embedding: int
    vocabulary: int
    kv_bytes_per_token: int  # K and V, all layers, at the engine's cache type
    trained_context: int | None
    basis: str


def gguf_shape(path: Path) -> ModelShape:
    from appliance.gguf_meta import read_metadata

    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as exc:
        raise InstallError(f"{path}: not a readable GGUF file (truncated or corrupt: {exc})") from None
    field = meta.fields.get

    arch = field("general.architecture")
    if not arch:
        raise InstallError(f"{path}: GGUF metadata has no general.architecture")
    layers = field(f"{arch}.block_count")
    heads = field(f"{arch}.attention.head_count")
    embedding = field(f"{arch}.embedding_length")
    if not layers or not heads or not embedding:
        raise InstallError(f"{path}: GGUF metadata lacks {arch}.block_count, attention.head_count or embedding_length")
    kv_heads = field(f"{arch}.attention.head_count_kv", heads)
    heads_per_layer = heads if isinstance(heads, list) else [heads] * layers
    kv_per_layer = kv_heads if isinstance(kv_heads, list) else [kv_heads] * layers
    head_size = embedding // max(heads_per_layer)
    key_size = field(f"{arch}.attention.key_length", head_size)
    value_size = field(f"{arch}.attention.value_length", head_size)
    kv_elements = sum(kv_per_layer) * (key_size + value_size)
    vocabulary = field(f"{arch}.vocab_size") or meta.array_lengths.get("tokenizer.ggml.tokens", 0)
    return ModelShape(
        weights_bytes=sum(t.n_bytes for t in meta.tensors),
        layers=int(layers),
        embedding=int(embedding),
        vocabulary=int(vocabulary),
        kv_bytes_per_token=kv_elements * KV_BYTES["f16"],
        trained_context=field(f"{arch}.context_length"),
        basis="GGUF metadata",
    )


def hf_shape(directory: Path) -> ModelShape:
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise InstallError(f"{directory}: not an HF-format model directory (no config.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InstallError(f"{config_file}: cannot read: {exc}") from None
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    if not weights:
        raise InstallError(f"{directory}: no *.safetensors weights found")
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InstallError(f"{config_file}: missing or bad {exc}") from None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_size = int(config.get("head_dim") or hidden // heads)
    dtype_bytes = KV_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)
    return ModelShape(
        weights_bytes=weights,
        layers=layers,
        embedding=hidden,
        vocabulary=int(config.get("vocab_size") or 0),
        kv_bytes_per_token=2 * layers * kv_heads * head_size * dtype_bytes,
        trained_context=config.get("max_position_embeddings"),
        basis="config.json + safetensors sizes",
    )


def model_shape(path: str | Path) -> ModelShape:
    path = Path(path)
    if path.is_dir():
        return hf_shape(path)
    if not path.is_file():
        raise InstallError(f"{path}: no such model file or directory")
    stat = path.stat()
    return _cached_gguf_shape(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_gguf_shape(path: Path, size: int, mtime_ns: int) -> ModelShape:
    """Reading GGUF metadata steps through the tokenizer's strings (milliseconds): once per file version."""
    return gguf_shape(path)


def llamacpp_compute_bytes(shape: ModelShape, context: int) -> int:
    logits = 4 * LLAMACPP_BATCH * shape.vocabulary
    activations = LLAMACPP_ACTIVATION_BYTES_PER_DIM * shape.embedding * context
    return LLAMACPP_COMPUTE_BASE_BYTES + logits + activations


def llamacpp_estimate(shape: ModelShape, context: int, slots: int = 1) -> MemoryEstimate:
    """One llama-server replica with `slots` parallel sequences of `context` tokens each."""
    kv = shape.kv_bytes_per_token * context * slots
    compute = llamacpp_compute_bytes(shape, context)
    runtime = LLAMACPP_RUNTIME_BYTES
    return MemoryEstimate(
        weights_bytes=shape.weights_bytes,
        kv_cache_bytes=kv,
        compute_bytes=compute,
        runtime_bytes=runtime,
        total_bytes=shape.weights_bytes + kv + compute + runtime,
        basis=shape.basis,
    )


def vllm_estimate(shape: ModelShape, max_model_len: int, max_num_seqs: int, tensor_parallel: int) -> MemoryEstimate:
    """Per GPU of a replica: its shard of weights and KV cache plus fixed reserves."""
    weights = shape.weights_bytes // tensor_parallel
    kv = shape.kv_bytes_per_token * max_model_len * max_num_seqs // tensor_parallel
    runtime = CUDA_CONTEXT_BYTES
    return MemoryEstimate(
        weights_bytes=weights,
        kv_cache_bytes=kv,
        compute_bytes=VLLM_ACTIVATION_BYTES,
        runtime_bytes=runtime,
        total_bytes=weights + kv + VLLM_ACTIVATION_BYTES + runtime,
        basis=shape.basis,
    )
