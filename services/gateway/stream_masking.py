"""Personal data masked in a streamed answer (`pii_responses`), as in a whole answer.

The relay's SSE events are rewritten on their way to the client: the texts of chat chunks
(`choices[i].delta.content`, `.reasoning_content` and `.reasoning`), of completions chunks
(`choices[i].text`), and the arguments of chat tool calls
(`choices[i].delta.tool_calls[j].function.arguments`).
A value can arrive split across chunks ("010-12", "34-5678"), and a context word up to 20
characters after a value can decide it (appliance/pii.py), so each text of each choice is
held back from where a value could still be growing: the word being written, with the digit
groups before it that one space may still join to it ("010 1234 5678"), an unclosed private
key block, and in any case the last HOLD_AFTER characters. What comes before is masked with
what follows it in view, and with the last CONTEXT characters already sent before it, and
sent in the next chunk of that choice; a chunk whose text was all held back goes out with
empty text. Tool-call arguments are JSON, masked value by value, so each call's fragments
are all held: its chunks go out with empty arguments (id, type, name as sent), and the whole
arguments, masked, follow in one chunk when the choice ends. A choice's finish_reason
flushes its texts in that chunk, after a chunk with its calls' arguments; an event without
choices (usage, an error) or [DONE] flushes every choice's, in chunks of their own. Every
other field and event passes unchanged and in order.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import msgspec

from appliance.governance import Policy
from appliance.policies import mask_answer, mask_arguments
from services.gateway.admission import CHAT_TEXTS
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


class _Text:
    __slots__ = ("held", "sent")

    def __init__(self):
        self.held = ""  # text not sent yet, as the engine wrote it
        self.sent = ""  # the end of what was sent (masked): context for what follows


class _Choice:
    __slots__ = ("chat", "texts", "calls")

    def __init__(self, chat: bool):
        self.chat = chat  # a chat delta, or a completions choice
        self.texts: dict[str, _Text] = {}  # by field: content, reasoning_content, or text
        self.calls: dict[int, str] = {}  # each tool call's arguments so far, as the engine wrote them


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
        ending: list[dict] = []  # the held arguments of the choices this chunk finishes
        for choice in choices:
            if isinstance(choice, dict) and self._choice(choice, ending):
                changed = True
        out = event[:at] + b"data: " + msgspec.json.encode(chunk) + event[end:] if changed else event
        return self._chunk(ending) + out + SEP

    def _choice(self, choice: dict, ending: list[dict]) -> bool:
        """Rewrite one choice's texts and arguments in place; whether it changed. When it
        finishes, its calls' whole arguments go to `ending`."""
        index = choice.get("index", 0)
        final = choice.get("finish_reason") is not None
        state = self.choices.pop(index, None) if final else self.choices.get(index)
        delta = choice.get("delta")
        if state is None:
            state = _Choice(isinstance(delta, dict))
            if not final:
                self.choices[index] = state
        holder = (delta if isinstance(delta, dict) else {}) if state.chat else choice
        changed = state.chat and self._hold_arguments(state, holder.get("tool_calls"))
        for field in CHAT_TEXTS if state.chat else ("text",):
            text = holder.get(field)
            if not isinstance(text, str):
                if field not in state.texts or not state.texts[field].held:
                    continue
                text = ""
            out = self._take(state.texts.setdefault(field, _Text()), text, final)
            if out != text:
                holder[field], changed = out, True
        if final and (arguments := self._arguments(index, state)):
            ending.append(arguments)
        if changed and state.chat:
            choice["delta"] = holder
        return changed

    @staticmethod
    def _hold_arguments(state: _Choice, calls) -> bool:
        """Hold the argument fragments of a delta's tool calls, leaving them empty; whether any was not."""
        changed = False
        for position, call in enumerate(calls if isinstance(calls, list) else []):
            function = call.get("function") if isinstance(call, dict) else None
            fragment = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(fragment, str):
                at = call.get("index", position)
                at = at if isinstance(at, int) else position
                state.calls[at] = state.calls.get(at, "") + fragment
                if fragment:
                    function["arguments"], changed = "", True
        return changed

    def _arguments(self, index: int, state: _Choice) -> dict | None:
        """A chunk's choice with the whole arguments of the choice's tool calls, masked."""
        calls = [{"index": at, "function": {"arguments": mask_arguments(self.policy, whole)}}
                 for at, whole in state.calls.items() if whole]
        state.calls = {}
        return {"index": index, "delta": {"tool_calls": calls}, "finish_reason": None} if calls else None

    def _take(self, state: _Text, text: str, final: bool) -> str:
        """The masked text that can be sent now; the rest stays held."""
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
        """Chunks with every choice's held arguments, then its held texts, masked: the stream ends."""
        calls = [arguments for index, state in self.choices.items() if (arguments := self._arguments(index, state))]
        choices = []
        for index, state in self.choices.items():
            texts = {field: text for field, held in state.texts.items() if (text := self._take(held, "", True))}
            if texts:
                choices.append({"index": index, "delta": texts, "finish_reason": None} if state.chat
                               else {"index": index, **texts, "finish_reason": None})
        self.choices = {}
        return self._chunk(calls) + self._chunk(choices)

    def _chunk(self, choices: list[dict]) -> bytes:
        """An event with these choices, and the latest chunk's id, model...; none without choices."""
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
