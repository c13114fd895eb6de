"""The one real request an engine answers before it counts as ready.

`appliance up` and the deployment controller send it through ManagedProcess; a systemd
engine unit runs `python -m services.engines.warmup` as its ExecStartPost and a k3s engine
container as its startup probe, so every engine is warmed up the same way:

    python -m services.engines.warmup --url http://127.0.0.1:PORT --model NAME --key-env VAR [--embeddings-only] [--no-wait]

Loading a model runs little of an engine's native code; the first token runs its matrix
kernels, where a build made for another CPU dies (SIGILL). Asking for one token at start
makes such a crash show there, not at the first user's request. A model that only
embeds (an encoder such as BERT) is asked for one embedding instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from appliance.config import ModelConfig
from services.engines.process import WarmUpFailed, direct, http_ok

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
    from appliance.gguf_meta import read_metadata

    try:
        fields = read_metadata(path).fields
    except (OSError, ValueError):
        return False
    arch = fields.get("general.architecture", "")
    causal, pooling = fields.get(f"{arch}.attention.causal"), fields.get(f"{arch}.pooling_type")
    return (causal is not None and not causal) or (pooling is not None and pooling != 0)


def warm_up_call(model: ModelConfig, base_url: str, api_key: str) -> Callable[[float], str]:
    """ManagedProcess.warm_up for one replica: POSTs the request, returns what took how long."""
    return warm_up_request(model.name, base_url, api_key, embeddings_only=embeds_only(model))


def warm_up_request(model: str, base_url: str, api_key: str, *, embeddings_only: bool) -> Callable[[float], str]:
    if embeddings_only:
        path, body, what = "/embeddings", {"model": model, "input": WARM_UP_TEXT}, "one embedding"
    else:
        path, body, what = "/completions", {"model": model, "prompt": WARM_UP_TEXT, "max_tokens": 1}, "one token"
    request = urllib.request.Request(
        base_url.rstrip("/") + path, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})

    def warm_up(timeout_s: float) -> str:
        started = time.monotonic()
        try:
            with direct.open(request, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            answer = exc.read()[:300].decode(errors="replace")
            raise WarmUpFailed(f"POST {path} answered HTTP {exc.code}: {answer}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise WarmUpFailed(f"POST {path} got no answer ({exc})") from None
        return f"warm-up: {what} in {time.monotonic() - started:.2f} s"

    return warm_up


def main(argv: list[str] | None = None) -> int:
    """Wait until the engine at --url answers /health, then warm it up; exit 1 if it fails."""
    parser = argparse.ArgumentParser(prog="python -m services.engines.warmup", description=main.__doc__)
    parser.add_argument("--url", required=True, help="the engine's root URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--model", required=True, help="the model name the engine serves")
    parser.add_argument("--key-env", required=True, help="the variable holding the engine's API key")
    parser.add_argument("--embeddings-only", action="store_true", help="ask for an embedding, not a token")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the warm-up request")
    parser.add_argument("--no-wait", action="store_true", help="fail at once if /health does not answer (a probe)")
    args = parser.parse_args(argv)
    key = os.environ.get(args.key_env)
    if not key:
        parser.error(f"--key-env: {args.key_env} is not set")
    root = args.url.rstrip("/")
    while not http_ok(f"{root}/health"):  # the unit's start timeout bounds the wait
        if args.no_wait:
            print(f"{root}/health does not answer yet", file=sys.stderr)
            return 1
        time.sleep(2)
    try:
        print(warm_up_request(args.model, f"{root}/v1", key, embeddings_only=args.embeddings_only)(args.timeout))
    except WarmUpFailed as exc:
        print(f"warm-up failed: {exc}", file=sys.stderr)
        return 1
    return 0


def warm_up_argv(python: str, url: str, model: ModelConfig, key_env: str, *, wait: bool = True) -> list[str]:
    """The warm-up as a command, for deployments whose engines are not children of `appliance up`."""
    argv = [python, "-m", "services.engines.warmup", "--url", url, "--model", model.name, "--key-env", key_env]
    return argv + (["--embeddings-only"] if embeds_only(model) else []) + ([] if wait else ["--no-wait"])


if __name__ == "__main__":
    sys.exit(main())
