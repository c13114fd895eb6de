"""The one real request an engine answers before it counts as ready.

Loading a model runs little of an engine's native code; the first token runs its matrix
kernels, where a build made for another CPU dies (SIGILL). Asking for one token at start
makes such a crash show there, not at the first user's request. A model that only
embeds (an encoder such as BERT) is asked for one embedding instead.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from appliance.config import ModelConfig
from services.engines.process import WarmUpFailed

WARM_UP_TEXT = "Hello"
# An HF-format model that generates names its language-model head in its architecture.
GENERATIVE_ARCHITECTURES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")


def embeds_only(model: ModelConfig) -> bool:
    """Whether the model serves embeddings and cannot generate text."""
    if not model.embeddings:
        return False
    path = Path(model.path)
    if path.is_dir():
        try:
            architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            return False
        return not any(name.endswith(GENERATIVE_ARCHITECTURES) for name in architectures)
    return _gguf_embeds_only(path)


def _gguf_embeds_only(path: Path) -> bool:
    """Embedding models' GGUF metadata names a pooling type, or turns causal attention off."""
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except (OSError, ValueError):
        return False
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else ""
    causal, pooling = fields.get(f"{arch}.attention.causal"), fields.get(f"{arch}.pooling_type")
    return (causal is not None and not causal.contents()) or (pooling is not None and pooling.contents() != 0)


def warm_up_call(model: ModelConfig, base_url: str, api_key: str) -> Callable[[float], str]:
    """ManagedProcess.warm_up for one replica: POSTs the request, returns what took how long."""
    if embeds_only(model):
        path, body, what = "/embeddings", {"model": model.name, "input": WARM_UP_TEXT}, "one embedding"
    else:
        path, body, what = "/completions", {"model": model.name, "prompt": WARM_UP_TEXT, "max_tokens": 1}, "one token"
    request = urllib.request.Request(
        base_url.rstrip("/") + path, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})

    def warm_up(timeout_s: float) -> str:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            answer = exc.read()[:300].decode(errors="replace")
            raise WarmUpFailed(f"POST {path} answered HTTP {exc.code}: {answer}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise WarmUpFailed(f"POST {path} got no answer ({exc})") from None
        return f"warm-up: {what} in {time.monotonic() - started:.2f} s"

    return warm_up
