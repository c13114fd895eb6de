"""What a request may ask of a local engine beyond the OpenAI API.

The gateway forwards the client's own bytes, so every top-level field reaches the engine,
and llama.cpp's server reads dozens of its own (grammar, json_schema, n_probs, samplers,
id_slot, lora, n_keep, dry_*, mirostat*, reasoning_format, ...). Some of those cost one
request far more than its tokens: n_probs (or a completion's logprobs) 1e9 returns every
token's probability at every step, dry_penalty_last_n 2^31 made an 8-token answer 20x
slower, an unknown reasoning_format is a 500. So, for llama.cpp and vLLM models (remote
upstreams get the request as sent, their API being theirs):
- the OpenAI fields pass, with the bounds services/gateway/schemas.py declares;
- a few sampling extensions that cost nothing extra pass, with bounds (EXTENSIONS);
- every other field is refused with a 400 naming it, unless the model's profile entry
  lists it in `engine_params`; then it is forwarded as sent, with no bounds of ours.
Per-key permissions for these come with governance.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from appliance.errors import InvalidRequest, invalid_value
from services.gateway.runtime import ServedModel
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

_COMMON = {"model", "stream", "stream_options", "temperature", "top_p", "presence_penalty", "frequency_penalty",
           "max_tokens", "n", "stop", "seed", "logit_bias", "logprobs", "user"}
# The OpenAI API's own request fields, by request type.
OPENAI_FIELDS: dict[type, frozenset[str]] = {
    ChatCompletionRequest: frozenset(_COMMON | {
        "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
        "response_format", "functions", "function_call", "metadata", "store", "modalities", "audio", "prediction",
        "reasoning_effort", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity",
        "web_search_options"}),
    CompletionRequest: frozenset(_COMMON | {"prompt", "best_of", "echo", "suffix"}),
    EmbeddingRequest: frozenset({"model", "input", "encoding_format", "dimensions", "user"}),
}

TopK = Annotated[int, msgspec.Meta(ge=0, le=1000)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]
RepeatPenalty = Annotated[float, msgspec.Meta(gt=0, le=2)]


class LlamaCppExtensions(msgspec.Struct, kw_only=True):
    """llama.cpp's sampling extensions that any client may use, with bounds."""

    top_k: TopK | None = None  # 0: off
    min_p: Probability | None = None
    typical_p: Probability | None = None  # 1: off
    repeat_penalty: RepeatPenalty | None = None  # 1: off
    repeat_last_n: Annotated[int, msgspec.Meta(ge=0, le=4096)] | None = None
    ignore_eos: bool | None = None  # bounded by max_tokens and the context like any answer


class VllmExtensions(msgspec.Struct, kw_only=True):
    """vLLM's sampling extensions that any client may use, with bounds."""

    top_k: Annotated[int, msgspec.Meta(ge=-1, le=1000)] | None = None  # -1 or 0: off
    min_p: Probability | None = None
    repetition_penalty: RepeatPenalty | None = None  # 1: off
    ignore_eos: bool | None = None


EXTENSIONS: dict[str, type[msgspec.Struct]] = {"llamacpp": LlamaCppExtensions, "vllm": VllmExtensions}


def check(fields: dict, parsed: msgspec.Struct, served: ServedModel) -> None:
    """Refuse (InvalidRequest naming it) a field of the request `fields` that `served`'s engine must not get."""
    known = OPENAI_FIELDS[type(parsed)]
    extensions = EXTENSIONS.get(served.engine)
    curated = extensions.__struct_fields__ if extensions else ()
    bounded = {}
    for name, value in fields.items():
        if name in known or name in served.engine_params:
            continue
        if name not in curated:
            raise InvalidRequest(
                f"'{name}' is an engine-specific parameter that this appliance does not accept for '{served.name}' "
                "(allow it with models[].engine_params in the profile).", param=name, code="unsupported_parameter")
        bounded[name] = value
    if bounded:
        try:
            msgspec.convert(bounded, extensions)
        except msgspec.ValidationError as exc:
            raise invalid_value(exc) from None
