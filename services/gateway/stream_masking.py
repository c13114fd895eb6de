"""Personal data masked in a streamed answer (`pii_responses`), as in a whole answer.

The relay's SSE events (chat chunks' `choices[i].delta.content`, completions chunks'
`choices[i].text`) are rewritten on their way to the client. A value can arrive split
across chunks ("010-12", "34-5678"), and a context word up to 20 characters after a value
can decide it (appliance/pii.py), so each choice's text is held back from where a value
could still be growing: the word being written, with the digit groups before it that one
space may still join to it ("010 1234 5678"), an unclosed private key block, and in any
case the last HOLD_AFTER characters. What comes before is masked with what follows it in
view, and with the last CONTEXT characters already sent before it, and sent in the next
chunk of that choice; a chunk whose text was all held back goes out with empty text. A
choice's finish_reason flushes its text, and an event without choices (usage, an error)
or [DONE] flushes every choice's, in a chunk of its own. Every other field and event
passes unchanged and in order.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import msgspec

from appliance.governance import Policy
from appliance.policies import mask_answer
from services.gateway.proxy import EVENT_BOUNDARY

HOLD_AFTER = 24  # pii.py reads context words up to 20 characters after a value
CONTEXT = 48  # and up to 30 before it: masked text already sent stays in view this long
MAX_HELD = 4096  # a longer run without a safe place to cut is sent anyway
_LAST_SPACE = re.compile(r"\s\S*\Z")
_NUMBER = "[0-9\uff10-\uff19+()\uff0b\uff08\uff09.\\-\uff0d\u2010-\u2013\u2212]"
_GROUP = re.compile(f"{_NUMBER}*")
_JOINED_GROUPS = re.compile(f"(?:{_NUMBER}+ )+\\Z")  # "010 1234 ": a next group may still join
_GROUPS_REACH = 48  # longer than any value written in spaced groups (cards, phones)
SEP = b"\n\n"


async def masked_stream(policy: Policy, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The relayed SSE pieces with the policy's detectors masked in their text."""
    masker = StreamMasker(policy)
    async for piece in pieces:
        if out := masker.feed(piece):
            yield out


class _Choice:
    __slots__ = ("held", "sent", "chat")

    def __init__(self, chat: bool):
        self.held = ""  # text not sent yet, as the engine wrote it
        self.sent = ""  # the end of what was sent (masked): context for what follows
        self.chat = chat  # a chat delta, or a completions choice


class StreamMasker:
    def __init__(self, policy: Policy):
        self.policy = policy
        self.buffer = b""
        self.choices: dict[int, _Choice] = {}
        self.latest: dict = {}  # the latest chunk with choices: a flush chunk copies its id, model...

    def feed(self, piece: bytes) -> bytes:
        *events, self.buffer = EVENT_BOUNDARY.split(self.buffer + piece)
        return b"".join(self._event(event) for event in events if event)

    def _event(self, event: bytes) -> bytes:
        at = event.find(b"data:")
        if at < 0:  # a comment
            return event + SEP
        end = event.find(b"\n", at)
        end = len(event) if end < 0 else end
        data = event[at + 5 : end].strip()
        if data == b"[DONE]":
            return self._flush() + event + SEP
        try:
            chunk = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return event + SEP
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list) or not choices:
            return self._flush() + event + SEP
        self.latest = chunk
        changed = False
        for choice in choices:
            if isinstance(choice, dict) and self._choice(choice):
                changed = True
        return event[:at] + b"data: " + msgspec.json.encode(chunk) + event[end:] + SEP if changed else event + SEP

    def _choice(self, choice: dict) -> bool:
        """Rewrite one choice's text in place; whether it changed."""
        index = choice.get("index", 0)
        final = choice.get("finish_reason") is not None
        state = self.choices.pop(index, None) if final else self.choices.get(index)
        delta = choice.get("delta")
        chat = isinstance(delta, dict) if state is None else state.chat
        holder, field = (delta if isinstance(delta, dict) else {}, "content") if chat else (choice, "text")
        text = holder.get(field)
        if not isinstance(text, str):
            if state is None or not state.held:
                return False
            text = ""
        if state is None:
            state = _Choice(chat)
            if not final:
                self.choices[index] = state
        out = self._take(state, text, final)
        if out == text:
            return False
        holder[field] = out
        if chat:
            choice["delta"] = holder
        return True

    def _take(self, state: _Choice, text: str, final: bool) -> str:
        """The masked text of the choice that can be sent now; the rest stays held."""
        held = state.held + text
        cut = len(held) if final else _safe_cut(held)
        out = self._masked(state.sent, held, cut) if cut else ""
        if out is None:  # what is still held changes how the text before it is masked
            out, cut = "", 0
        state.held = held[cut:]
        state.sent = (state.sent + out)[-CONTEXT:]
        return out

    def _masked(self, sent: str, held: str, cut: int) -> str | None:
        """held[:cut] masked, with `sent` before it in view; None while the text after the cut
        still changes it (a context word about a value just before the cut)."""
        context = sent
        head = mask_answer(self.policy, context + held[:cut])
        if not head.startswith(context):  # sent text now reads as a value: too late for it
            context, head = "", mask_answer(self.policy, held[:cut])
        if cut < len(held) and not mask_answer(self.policy, context + held).startswith(head):
            return None
        return head[len(context) :]

    def _flush(self) -> bytes:
        """A chunk with every choice's held text, masked: the stream ends."""
        choices = []
        for index, state in self.choices.items():
            if text := self._take(state, "", True):
                choices.append({"index": index, "delta": {"content": text}, "finish_reason": None} if state.chat
                               else {"index": index, "text": text, "finish_reason": None})
        self.choices = {}
        if not choices:
            return b""
        chunk = {key: value for key, value in self.latest.items() if key not in ("choices", "usage", "timings")}
        return b"data: " + msgspec.json.encode({**chunk, "choices": choices}) + SEP


def _safe_cut(held: str) -> int:
    """Where no value can still be growing across, at least HOLD_AFTER characters from the end."""
    end = len(held) - HOLD_AFTER
    begin = held.rfind("-----BEGIN")
    if begin >= 0:  # a private key block is masked whole, once it is closed
        close = held.find("-----END", begin)
        if close < 0 or held.find("KEY-----", close) < 0:
            end = min(end, begin)
    if end <= 0:
        return max(0, len(held) - MAX_HELD)
    space = _LAST_SPACE.search(held, 0, end)
    start = space.start() + 1 if space else 0
    if _GROUP.fullmatch(held, start, end):  # the word may still be, or become, one more digit group
        groups = _JOINED_GROUPS.search(held, max(0, start - _GROUPS_REACH), start)
        start = groups.start() if groups else start
    return max(start, len(held) - MAX_HELD)
