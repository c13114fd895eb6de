"""llama-cpp-python's OpenAI server, with the fixes the gateway relies on.

- Streams: the stock server ignores `stream_options`, so a streamed answer carries no
  usage and could not be metered. Each generation's prompt and completion tokens are
  counted and an OpenAI usage chunk (empty `choices`) ends every stream; the gateway
  hides it from clients that did not ask for it.
- Embeddings: the server cannot set a pooling type, and a chat model's GGUF names none,
  so /v1/embeddings would return one vector per token. Mean pooling gives one per input.
- Health: every stock route waits for the model lock, so a busy engine looks dead to a
  health probe. GET /health answers at once once the model is loaded.
- Crashes: faulthandler writes the Python stack of a native crash to the log.

Everything else is the stock server: it takes the same flags as `python -m llama_cpp.server`.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import llama_cpp

_stock_create_app = None


class ServedLlama(llama_cpp.Llama):
    _prompt_tokens = 0
    _completion_tokens = 0

    def __init__(self, *args, **kwargs):
        if kwargs.get("embedding") and kwargs.get("pooling_type", -1) == llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED:
            kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        super().__init__(*args, **kwargs)

    def generate(self, tokens, *args, **kwargs):
        # Completion counts the tokens that end up in the answer: every sampled token
        # except end-of-generation, exactly as Llama's own non-streaming usage does.
        self._prompt_tokens, self._completion_tokens = len(tokens), 0
        vocab = self._model.vocab
        for token in super().generate(tokens, *args, **kwargs):
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                self._completion_tokens += 1
            yield token

    def __call__(self, *args, **kwargs):
        result = super().__call__(*args, **kwargs)
        return self._with_usage(result, "text_completion") if kwargs.get("stream") else result

    def create_chat_completion(self, *args, **kwargs):
        result = super().create_chat_completion(*args, **kwargs)
        return self._with_usage(result, "chat.completion.chunk") if kwargs.get("stream") else result

    def _with_usage(self, chunks: Iterator[dict], object_name: str) -> Iterator[dict]:
        last: dict = {}
        for chunk in chunks:
            last = chunk
            yield chunk
        yield {
            "id": last.get("id", ""),
            "object": object_name,
            "created": last.get("created", 0),
            "model": last.get("model", ""),
            "choices": [],
            "usage": {
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "total_tokens": self._prompt_tokens + self._completion_tokens,
            },
        }


def _create_app_with_health(*args, **kwargs):
    app = _stock_create_app(*args, **kwargs)  # loads the model before returning

    @app.get("/health", include_in_schema=False)
    async def health() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    global _stock_create_app
    # A native crash (SIGILL, SIGSEGV, ...) leaves the Python stack in the engine's log; the
    # process still dies by the signal, which the supervisor names (services/engines/exits.py).
    faulthandler.enable()
    import llama_cpp.server.app as server_app

    llama_cpp.Llama = ServedLlama  # the server's model loader builds llama_cpp.Llama
    _stock_create_app, server_app.create_app = server_app.create_app, _create_app_with_health
    from llama_cpp.server.__main__ import main as serve  # imports the patched create_app

    serve()


if __name__ == "__main__":
    main()
