"""Shadow traffic: a share of a route's answered requests sent again to another model, off
the client's path, and the two answers compared.

The copy goes out after the client has its answer, as a non-streamed request, with the
caller's policy (a caller kept on the appliance never has a copy sent to a remote model)
but outside metering and budgets: no usage row, no limit spent. A local shadow model whose
engine slots are all busy is skipped rather than queued, so shadows never delay real
traffic. Each copy's latency, tokens, status and the similarity of its answer's text to
the client's (word-level, difflib's ratio: 1 is identical) are written to the
shadow_results table within a second and summarised per route by /admin/routes.
"""

from __future__ import annotations

import difflib

import msgspec

SKIPPED = "skipped"


class _Delta(msgspec.Struct):
    content: str | None = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    delta: _Delta | None = None
    text: str | None = None


class _Answer(msgspec.Struct):
    choices: list[_Choice] = []


_decode = msgspec.json.Decoder(_Answer).decode


def answer_text(answer: bytes, stream: bool) -> str:
    """The text of a chat or completion answer (the first choice's), whole or streamed."""
    if not stream:
        return _text(_decode(answer))
    parts = []
    for line in answer.splitlines():
        if line.startswith(b"data: {"):
            try:
                parts.append(_text(_decode(line[6:])))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
    return "".join(parts)


def _text(answer: _Answer) -> str:
    if not answer.choices:
        return ""
    choice = answer.choices[0]
    part = choice.message or choice.delta
    return (part.content if part is not None else choice.text) or ""


def similarity(a: str, b: str) -> float:
    """How alike two answers read, 0 to 1, word by word."""
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio() if a or b else 1.0


def non_streamed(body: bytes) -> bytes:
    """The client's request asked whole: the copy is compared once it is complete."""
    data = msgspec.json.decode(body)
    data.pop("stream", None)
    data.pop("stream_options", None)
    return msgspec.json.encode(data)
