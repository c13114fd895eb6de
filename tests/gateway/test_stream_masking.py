"""Masking a streamed answer (services/gateway/stream_masking.py) on real SSE bytes: values
split across chunks, several choices, reasoning, tool-call arguments, the end of the stream,
and events without text."""

from __future__ import annotations

import asyncio
import json
from itertools import zip_longest

from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from appliance.governance import Policy
from appliance.policies import mask_answer, mask_arguments
from services.gateway.errors import DONE_EVENT
from services.gateway.stream_masking import HOLD_AFTER, masked_stream

POLICY = Policy(pii={"phone": "mask", "kr_rrn": "mask", "bank_account": "mask"}, pii_responses=True)
ANSWER = "Call 010-1234-5678 or, for the form, RRN 990101-1234567. Thanks!"


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def chat_chunk(*choices: dict, **fields) -> bytes:
    return event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                  "choices": list(choices), **fields})


def delta(text: str | None, index: int = 0, finish: str | None = None) -> dict:
    return {"index": index, "delta": {} if text is None else {"content": text}, "finish_reason": finish}


def pieces_of(text: str, size: int, index: int = 0) -> list[bytes]:
    return [chat_chunk(delta(text[i : i + size], index)) for i in range(0, len(text), size)]


def streamed(pieces: list[bytes], policy: Policy = POLICY) -> list[bytes]:
    async def source():
        for piece in pieces:
            yield piece

    async def run():
        return [out async for out in masked_stream(policy, source())]

    return asyncio.run(run())


def events(out: list[bytes]) -> list[bytes]:
    return [e + b"\n\n" for e in b"".join(out).split(b"\n\n") if e]


def texts(out: list[bytes], field: str = "content") -> dict[int, str]:
    """Each choice's text (a chat delta's `field`), as a client puts it together."""
    joined: dict[int, str] = {}
    for e in events(out):
        if e.startswith(b"data: {"):
            for choice in json.loads(e[6:]).get("choices", []):
                text = choice["delta"].get(field) if "delta" in choice else choice.get("text")
                joined[choice["index"]] = joined.get(choice["index"], "") + (text or "")
    return joined


def tool_call(at: int, arguments: str, name: str | None = None) -> dict:
    """A chat choice with a tool call's fragment: the first one of a call names it."""
    call = {"index": at, "function": {"arguments": arguments}}
    if name:
        call = {"index": at, "id": f"call_{at}", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}


def call_pieces(at: int, name: str, arguments: str, size: int) -> list[bytes]:
    return [chat_chunk(tool_call(at, "", name))] + [
        chat_chunk(tool_call(at, arguments[i : i + size])) for i in range(0, len(arguments), size)]


def arguments(out: list[bytes]) -> dict[int, str]:
    """Each tool call's arguments (of choice 0), as a client puts them together."""
    joined: dict[int, str] = {}
    for e in events(out):
        if e.startswith(b"data: {"):
            for choice in json.loads(e[6:]).get("choices", []):
                for call in choice.get("delta", {}).get("tool_calls") or []:
                    joined[call["index"]] = joined.get(call["index"], "") + call["function"].get("arguments", "")
    return joined


def test_values_split_across_chunks_are_masked_as_in_the_whole_answer():
    pieces = pieces_of(ANSWER, 3) + [chat_chunk(delta(None, finish="stop")), DONE_EVENT]
    out = streamed(pieces)
    assert texts(out) == {0: "Call [PHONE] or, for the form, RRN [KR_RRN]. Thanks!"}
    assert texts(out)[0] == mask_answer(POLICY, ANSWER)
    sent = b"".join(out)
    assert b"1234" not in sent and b"5678" not in sent and b"990101" not in sent
    assert len(events(out)) == len(pieces)  # a chunk whose text is held back still goes out, with ""
    assert events(out)[-1] == DONE_EVENT


def test_context_words_before_and_after_a_value_count_as_in_the_whole_answer():
    # A bank account is one only next to an account word: written after the number, it is
    # waited for; written before, it was sent already and is still in view.
    for answer in ("110-123-456789 계좌로 보내 주세요. 입금이 확인되면 바로 연락드리겠습니다.",
                   "Send it to my account, the number is 110-123-456789 as usual, thank you very much."):
        out = streamed(pieces_of(answer, 2) + [chat_chunk(delta(None, finish="stop")), DONE_EVENT])
        assert texts(out)[0] == mask_answer(POLICY, answer) and "[BANK_ACCOUNT]" in texts(out)[0]


def test_a_private_key_is_held_until_its_block_closes():
    policy = Policy(pii={"secret": "mask"}, pii_responses=True)
    body = "\n".join(["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"] * 4)
    answer = f"Here it is:\n-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----\nKeep it safe."
    out = streamed(pieces_of(answer, 4) + [chat_chunk(delta(None, finish="stop")), DONE_EVENT], policy)
    assert texts(out)[0] == mask_answer(policy, answer) == "Here it is:\n[SECRET]\nKeep it safe."


def test_digit_groups_that_a_space_may_still_join_are_held_together():
    # 4111 1111 1111 1111 is a card by itself, and so is the 19-digit number it starts.
    policy = Policy(pii={"credit_card": "mask"}, pii_responses=True)
    answer = "Pay with 4111 1111 1111 1111 128 before the end of the month, please."
    out = streamed(pieces_of(answer, 2) + [chat_chunk(delta(None, finish="stop")), DONE_EVENT], policy)
    assert texts(out)[0] == mask_answer(policy, answer) == "Pay with [CREDIT_CARD] before the end of the month, please."


def test_text_is_held_back_only_near_its_end():
    words = "The capital of France is Paris, and it is a large city on the Seine. " * 4
    out = streamed(pieces_of(words, 4))
    released = texts(out)[0]
    assert words.startswith(released) and len(released) >= len(words) - HOLD_AFTER - len("Seine. ")


def test_several_choices_are_held_apart():
    first, second = "Phone: 010-1234-5678 ok", "RRN: 990101-1234567 ok"
    pieces = [piece for a, b in zip(pieces_of(first, 3, 0), pieces_of(second, 3, 1)) for piece in (a, b)]
    pieces += [chat_chunk(delta(None, 0, "stop"), delta(None, 1, "stop")), DONE_EVENT]
    assert texts(streamed(pieces)) == {0: "Phone: [PHONE] ok", 1: "RRN: [KR_RRN] ok"}


def test_the_end_of_a_stream_flushes_what_is_held_before_done():
    # Completions chunks, and no finish_reason: [DONE] flushes the held text in a chunk of its own.
    pieces = [event({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "text": ANSWER[i : i + 5], "finish_reason": None}]})
              for i in range(0, len(ANSWER), 5)]
    out = events(streamed([*pieces, DONE_EVENT]))
    assert texts(out) == {0: mask_answer(POLICY, ANSWER)}
    flush = json.loads(out[-2][6:])
    assert flush["id"] == "cmpl-1" and flush["choices"][0]["text"] and out[-1] == DONE_EVENT


def test_a_stream_that_fails_sends_its_held_text_before_the_error():
    error = b'data: {"error": {"message": "engine died", "type": "engine_error"}}\n\n'
    out = events(streamed([*pieces_of("Reach me at 010-1234-5678", 3), error, DONE_EVENT]))
    assert texts(out) == {0: "Reach me at [PHONE]"}
    assert out[-2:] == [error, DONE_EVENT]


def test_events_without_text_pass_byte_for_byte():
    role = chat_chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    call = chat_chunk(tool_call(0, "", "dial"))  # a call's first chunk, with no arguments yet
    finish = chat_chunk(delta(None, finish="tool_calls"))
    usage = chat_chunk(usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14})
    comment = b": keep-alive\n\n"
    pieces = [role, comment, call, finish, usage, DONE_EVENT]
    assert events(streamed(pieces)) == pieces


def test_a_stream_with_nothing_to_mask_adds_up_to_the_same_text():
    answer = "서울의 인구는 약 940만 명이며, 2023년 기준입니다. Version 1.2.3 of the tool (build 20240101)."
    pieces = pieces_of(answer, 3) + [chat_chunk(delta(None, finish="stop")), DONE_EVENT]
    assert texts(streamed(pieces)) == {0: answer}


def test_reasoning_is_masked_as_the_content_is_and_flushed_in_its_own_field():
    thought = "The user gave 010-1234-5678 and RRN 990101-1234567, so I should call them."
    pieces = [chat_chunk({"index": 0, "delta": {"reasoning_content": thought[i : i + 3]}, "finish_reason": None})
              for i in range(0, len(thought), 3)]
    for end in ([chat_chunk(delta(None, finish="stop")), DONE_EVENT], [DONE_EVENT]):  # finish_reason, or [DONE]
        out = streamed(pieces + pieces_of("Done.", 2) + end)
        assert texts(out, "reasoning_content") == {0: mask_answer(POLICY, thought)}
        assert texts(out) == {0: "Done."}
        assert b"1234" not in b"".join(out) and b"990101" not in b"".join(out)


def test_tool_call_arguments_are_held_and_sent_whole_and_masked_before_the_finish():
    args = '{"to": "010-1234-5678", "note": "call after 9"}'
    finish = chat_chunk(delta(None, finish="tool_calls"))
    pieces = call_pieces(0, "dial", args, 4) + [finish, DONE_EVENT]
    out = events(streamed(pieces))
    assert arguments(out) == {0: mask_arguments(POLICY, args)} == {0: '{"to":"[PHONE]","note":"call after 9"}'}
    assert b"1234" not in b"".join(out)
    first = json.loads(out[0][6:])["choices"][0]["delta"]["tool_calls"][0]
    assert first == {"index": 0, "id": "call_0", "type": "function", "function": {"name": "dial", "arguments": ""}}
    assert out[-3:] == [b"data: " + json.dumps(  # the whole arguments, then the finish chunk as it came
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
             "arguments": '{"to":"[PHONE]","note":"call after 9"}'}}]}, "finish_reason": None}]},
        separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n", finish, DONE_EVENT]
    assert len(out) == len(pieces) + 1


def test_tool_call_arguments_with_nothing_to_mask_keep_their_exact_text():
    args = '{"city":  "Seoul", "days": 3, "units": "\\u00b0C", "when": "2024-01-01"}'  # not as msgspec writes it
    out = streamed(call_pieces(0, "weather", args, 5) + [chat_chunk(delta(None, finish="tool_calls")), DONE_EVENT])
    assert arguments(out) == {0: args}


def test_parallel_tool_calls_are_held_apart_and_flushed_at_the_end():
    first, second = '{"phone": "010-1234-5678"}', '{"rrn": "990101-1234567", "ok": true}'
    pieces = [piece for pair in zip_longest(call_pieces(0, "dial", first, 3), call_pieces(1, "file", second, 3))
              for piece in pair if piece]
    usage = chat_chunk(usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14})
    out = events(streamed([*pieces, usage, DONE_EVENT]))  # no finish_reason: the usage event flushes
    assert arguments(out) == {0: '{"phone":"[PHONE]"}', 1: '{"rrn":"[KR_RRN]","ok":true}'}
    assert out[-2:] == [usage, DONE_EVENT]


def test_the_openai_sdk_puts_masked_arguments_and_text_together():
    args = '{"to": "010-1234-5678"}'
    pieces = pieces_of("Calling 010-1234-5678 now.", 3) + call_pieces(0, "dial", args, 4) + [
        chat_chunk(delta(None, finish="tool_calls"))]
    state = ChatCompletionStreamState()
    for e in events(streamed(pieces)):
        state.handle_chunk(ChatCompletionChunk.model_validate_json(e[6:]))
    message = state.get_final_completion().choices[0].message
    assert message.content == "Calling [PHONE] now."
    assert [(call.id, call.function.name, call.function.arguments) for call in message.tool_calls] == [
        ("call_0", "dial", '{"to":"[PHONE]"}')]
