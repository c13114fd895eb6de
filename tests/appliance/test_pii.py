"""PII detectors: each kind found when real and valid, left alone when it only looks alike."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from appliance.pii import KINDS, Match, find_pii, mask_table, mask_text, redact_sample, scan_table
from appliance.tabular import load_table, write_table

SK_AP = "sk-ap-Q3v9xL0aZp7TnR2yWm5KcB8uHd4Jf6Ge1Sx0Vq7Ni2P"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234\n-----END RSA PRIVATE KEY-----"


def kinds_and_values(text: str) -> list[tuple[str, str]]:
    return [(match.kind, match.value) for match in find_pii(text)]


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("메일은 kim.minji+ml@example.co.kr입니다", "email", "kim.minji+ml@example.co.kr"),
        ("write to j_doe@mail.example.com.", "email", "j_doe@mail.example.com"),
        ("휴대폰 010-1234-5678로 연락", "phone", "010-1234-5678"),
        ("mobile 01012345678", "phone", "01012345678"),
        ("intl +82 10-1234-5678 ok", "phone", "+82 10-1234-5678"),
        ("서울 02-123-4567", "phone", "02-123-4567"),
        ("서울 02-1234-5678", "phone", "02-1234-5678"),
        ("경기 031-123-4567", "phone", "031-123-4567"),
        ("부산 051-1234-5678", "phone", "051-1234-5678"),
        ("office (02) 123-4567", "phone", "(02) 123-4567"),
        ("US +1 415 555 2671", "phone", "+1 415 555 2671"),
        ("UK +44 20 7946 0958", "phone", "+44 20 7946 0958"),
        ("주민번호 900101-1234568", "kr_rrn", "900101-1234568"),
        ("rrn 9001011234568", "kr_rrn", "9001011234568"),
        ("born 2001: 010203-3234560", "kr_rrn", "010203-3234560"),
        ("visa 4111 1111 1111 1111 exp 12/29", "credit_card", "4111 1111 1111 1111"),
        ("mc 5555-5555-5555-4444", "credit_card", "5555-5555-5555-4444"),
        ("amex 378282246310005", "credit_card", "378282246310005"),
        ("amex 3782 822463 10005", "credit_card", "3782 822463 10005"),
        ("card 4111 1111 1111 1111 2 times", "credit_card", "4111 1111 1111 1111"),
        ("server 192.168.0.10.", "ip_address", "192.168.0.10"),
        ("ipv6 2001:db8::8a2e:370:7334 up", "ip_address", "2001:db8::8a2e:370:7334"),
        ("loopback ::1", "ip_address", "::1"),
        ("mapped ::ffff:192.0.2.1", "ip_address", "::ffff:192.0.2.1"),
        (f"key={SK_AP}", "secret", SK_AP),
        ("openai sk-proj-abcDEF123456ghiJKL789mno", "secret", "sk-proj-abcDEF123456ghiJKL789mno"),
        ("aws AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
        ("aws ASIAY34FZKBOKMUTVV7A", "secret", "ASIAY34FZKBOKMUTVV7A"),
        ("gh 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", "secret", "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"),
        ("gh github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyz0123456789", "secret", "github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyz0123456789"),
        ("slack xoxb-123456789012-abcdefABCDEF", "secret", "xoxb-123456789012-abcdefABCDEF"),
        ("google AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", "secret", "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe"),
        (f"token {JWT} end", "secret", JWT),
        ("Authorization: Bearer abc123def456ghi789jkl", "secret", "abc123def456ghi789jkl"),
        (f"key file:\n{PEM}\nthanks", "secret", PEM),
    ],
)
def test_finds_each_kind(text, kind, value):
    assert kinds_and_values(text) == [(kind, value)]
    [match] = find_pii(text)
    assert text[match.start : match.end] == value


@pytest.mark.parametrize(
    "text",
    [
        "Hello, how are you today?",
        "user@localhost and @handle and pkg@1.2.3",  # no domain with a top-level domain
        "random 1234567890 and 12345678 and 0212345 and 09012345678",  # not valid phone numbers
        "on 2024-01-15 or 20240115 at 12:30:45",  # dates and times
        "900101-1234567 wrong check digit",
        "901301-1234565 month 13",
        "900101-9234560 gender digit 9",
        "4111 1111 1111 1112 fails Luhn",
        "1234567890123452 passes Luhn with no issuer",
        "1700000000004 a millisecond timestamp",
        "version 1.2.3, v1.2.3.4, 1.2.3.4.5, 999.1.1.1, 01.02.03.04",
        "std::vector and 12:30:45 and 00:1A:2B:3C:4D:5E",
        "sk-learn-tutorials-for-beginners and Bearer of bad news",
        "AKIA1234 ghp_short xoxb-1 AIzaShort eyJhbGciOi",
        "price 3,000,000원, 15.5%, 1e10",
    ],
)
def test_leaves_lookalikes_alone(text):
    assert find_pii(text) == []


def test_overlaps_go_to_the_more_specific_kind():
    assert kinds_and_values("01012345678@example.com") == [("email", "01012345678@example.com")]
    assert kinds_and_values("Bearer 010-1234-5678-abcdefgh") == [("secret", "010-1234-5678-abcdefgh")]
    assert kinds_and_values("9001011234568") == [("kr_rrn", "9001011234568")]
    text = "a@b.io 010-1234-5678 900101-1234568 4111111111111111 10.0.0.1 " + SK_AP
    matches = find_pii(text)
    assert [m.kind for m in matches] == ["email", "phone", "kr_rrn", "credit_card", "ip_address", "secret"]
    assert all(a.end <= b.start for a, b in zip(matches, matches[1:])), "sorted and disjoint"
    assert matches[0] == Match("email", 0, 6, "a@b.io")


def test_mask_text_replaces_every_match_with_its_placeholder():
    text = f"민지 010-1234-5678, minji@example.com, 900101-1234568, 4111-1111-1111-1111, 10.0.0.1, {SK_AP}"
    masked, counts = mask_text(text)
    assert masked == "민지 [PHONE], [EMAIL], [KR_RRN], [CREDIT_CARD], [IP_ADDRESS], [SECRET]"
    assert counts == Counter({"phone": 1, "email": 1, "kr_rrn": 1, "credit_card": 1, "ip_address": 1, "secret": 1})
    assert mask_text("nothing here") == ("nothing here", Counter())


@pytest.mark.parametrize(
    "kind, value, expected",
    [
        ("email", "jane.doe@example.com", "j***@example.com"),
        ("phone", "010-1234-5678", "010-****-5678"),
        ("phone", "01012345678", "010****5678"),
        ("phone", "+1 415 555 2671", "+1 *** *** 2671"),
        ("kr_rrn", "900101-1234568", "900101-1******"),
        ("credit_card", "4111 1111 1111 1111", "**** **** **** 1111"),
        ("ip_address", "192.168.0.10", "192.168.*.*"),
        ("ip_address", "2001:db8::8a2e:370:7334", "2001:db8:…"),
        ("secret", SK_AP, "sk-a…"),
        ("secret", PEM, "-----BEGIN RSA PRIVATE KEY-----…"),
    ],
)
def test_redacted_samples_never_repeat_the_value(kind, value, expected):
    assert redact_sample(kind, value) == expected
    assert value not in expected


def test_redact_sample_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown PII kind 'ssn'"):
        redact_sample("ssn", "123-45-6789")


CHAT_ROWS = [
    {"id": 1, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "note": None},
    {
        "id": 2,
        "messages": [
            {"role": "user", "content": "제 번호는 010-1234-5678이고 메일은 minji@example.com이에요"},
            {"role": "assistant", "content": "주민번호 900101-1234568 은 보내지 마세요"},
        ],
        "note": "from 10.0.0.1",
    },
    {"id": 3, "messages": [{"role": "user", "content": "call 02-123-4567 or 02-1234-5678 or 031-123-4567"}], "note": "ok"},
]


@pytest.fixture
def chat(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in CHAT_ROWS), encoding="utf-8")
    return load_table(path, "jsonl")


def test_scan_table_counts_nested_strings_with_paths_and_redacted_samples(chat):
    report = scan_table(chat, samples_per_kind=2)
    assert json.loads(json.dumps(report)) == report
    assert report["rows_scanned"] == 3 and report["rows_with_pii"] == 2
    assert report["counts"] == {"secret": 0, "kr_rrn": 1, "credit_card": 0, "email": 1, "ip_address": 1, "phone": 4}
    assert set(report["counts"]) == set(KINDS)
    assert report["by_column"] == {
        "messages": {"secret": 0, "kr_rrn": 1, "credit_card": 0, "email": 1, "ip_address": 0, "phone": 4},
        "note": {"secret": 0, "kr_rrn": 0, "credit_card": 0, "email": 0, "ip_address": 1, "phone": 0},
    }
    assert report["samples"] == [
        {"kind": "phone", "row": 1, "column": "messages", "path": "messages[0].content", "value": "010-****-5678"},
        {"kind": "email", "row": 1, "column": "messages", "path": "messages[0].content", "value": "m***@example.com"},
        {"kind": "kr_rrn", "row": 1, "column": "messages", "path": "messages[1].content", "value": "900101-1******"},
        {"kind": "phone", "row": 2, "column": "messages", "path": "messages[0].content", "value": "02-***-4567"},
        {"kind": "ip_address", "row": 1, "column": "note", "path": "note", "value": "10.0.*.*"},
    ], "at most two samples per kind"


def test_mask_table_masks_nested_strings_and_round_trips_through_jsonl(chat, tmp_path):
    masked, counts = mask_table(chat)
    assert masked.schema == chat.schema
    assert counts == {"secret": 0, "kr_rrn": 1, "credit_card": 0, "email": 1, "ip_address": 1, "phone": 4}
    path = tmp_path / "masked.jsonl"
    write_table(masked, path, "jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == CHAT_ROWS[0]
    assert rows[1]["messages"] == [
        {"role": "user", "content": "제 번호는 [PHONE]이고 메일은 [EMAIL]이에요"},
        {"role": "assistant", "content": "주민번호 [KR_RRN] 은 보내지 마세요"},
    ]
    assert rows[1]["note"] == "from [IP_ADDRESS]"
    assert rows[2]["messages"][0]["content"] == "call [PHONE] or [PHONE] or [PHONE]"
    assert scan_table(load_table(path, "jsonl"))["rows_with_pii"] == 0


def test_mask_table_handles_maps_dictionaries_and_other_types():
    table = pa.table({
        "attrs": pa.array([[("mail", "a@b.io")], None], pa.map_(pa.string(), pa.string())),
        "city": pa.array(["10.0.0.1", "Seoul"]).dictionary_encode(),
        "n": [1, 2],
    })
    masked, counts = mask_table(table)
    assert masked.schema == table.schema
    assert masked.column("attrs").to_pylist() == [[("mail", "[EMAIL]")], None]
    assert masked.column("city").to_pylist() == ["[IP_ADDRESS]", "Seoul"]
    assert counts["email"] == 1 and counts["ip_address"] == 1
    assert scan_table(table)["samples"][0]["path"] == "attrs[0][1]"


def test_scanning_many_rows_counts_every_phone_and_no_version_or_date():
    texts = [f"주문 {n}번 배송 문의, 버전 1.2.{n % 10}, 2024-01-{n % 28 + 1:02d}" if n % 10 else f"연락처 010-{2000 + n % 3000:04d}-5678" for n in range(20_000)]
    report = scan_table(pa.table({"text": texts}))
    assert report["rows_scanned"] == 20_000
    assert report["counts"]["phone"] == report["rows_with_pii"] == 2_000
