"""The OpenAI request fields the gateway checks before forwarding.

Only the fields the gateway needs or can validate cheaply are declared, with bounds where
an engine lacks them (llama.cpp takes any logprobs count, temperature or token-id key);
every other field is ignored here and reaches a remote upstream unchanged, because the
gateway forwards the client's original bytes. What a local engine may get beyond these:
services/gateway/engine_params.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from appliance.errors import InvalidRequest, invalid_value

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]  # engines count in int32
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]  # llama.cpp answers up to the whole vocabulary per token
TokenId = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,10}$")]  # llama.cpp would tokenise any other key as text
Stop = str | list[str] | None
_KEY_AT = re.compile(r" - at `key` in `(\$[^`]*)`$")


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


# Content parts: text is what every engine here reads; the other kinds are declared so a
# text-only engine can refuse them by name (services/gateway/adapters.py).
class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: dict


class AudioPart(msgspec.Struct, tag="input_audio", tag_field="type"):
    input_audio: dict


class FilePart(msgspec.Struct, tag="file", tag_field="type"):
    file: dict


class RefusalPart(msgspec.Struct, tag="refusal", tag_field="type"):
    refusal: str


ContentPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart
FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(msgspec.Struct, tag="function", tag_field="type"):
    function: FunctionDefinition


class FunctionChoice(msgspec.Struct):
    name: FunctionName


class NamedToolChoice(msgspec.Struct, tag="function", tag_field="type"):
    function: FunctionChoice


class TextFormat(msgspec.Struct, tag="text", tag_field="type"):
    pass


class JsonObjectFormat(msgspec.Struct, tag="json_object", tag_field="type"):
    pass


SchemaName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class JsonSchema(msgspec.Struct, kw_only=True):
    name: SchemaName
    schema: dict = {}  # a JSON Schema object; empty: any JSON
    description: str | None = None
    strict: bool | None = None


class JsonSchemaFormat(msgspec.Struct, tag="json_schema", tag_field="type"):
    json_schema: JsonSchema


class _Sampling(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    max_tokens: PositiveInt | None = None
    n: PositiveInt | None = None  # at most gateway.max_n
    stop: Stop = None
    seed: int | None = None
    logit_bias: dict[TokenId, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list  # text, texts, or token ids (llama.cpp refuses ids outside its vocabulary)
    logprobs: TopLogprobs | None = None  # how many per token


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list  # text, texts, or token ids
    encoding_format: Literal["float", "base64"] | None = None


def decode(body: bytes, schema: type[msgspec.Struct]) -> msgspec.Struct:
    """Parse and check a request body; a bad one raises InvalidRequest naming the field."""
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        # A bad key (e.g. of logit_bias) names the object that holds it.
        raise invalid_value(msgspec.ValidationError(_KEY_AT.sub(r" in a key - at `\1`", str(exc)))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("The JSON body of your request is nested too deeply.", code="invalid_json") from None


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class HasUsage(msgspec.Struct):
    """Just the usage of an engine's answer, decoded without the rest."""

    usage: Usage | None = None


class StreamChunk(msgspec.Struct):
    """The parts of a streamed chunk the gateway looks at."""

    usage: Usage | None = None
    choices: list = []
