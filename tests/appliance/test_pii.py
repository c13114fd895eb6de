"""PII detectors: each kind found when real and valid, left alone when it only looks alike."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from appliance.errors import InvalidRequest
from appliance.pii import KINDS, Match, detector, find_pii, mask_table, mask_text, redact_sample, scan_table
from appliance.tabular import load_table, write_table
from bench.pii_accuracy import load_corpus, score

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
        ("주민번호 211015-3123450이야", "kr_rrn", "211015-3123450"),  # issued after October 2020: no valid check digit
        ("제 번호는 900101-1234567이야", "kr_rrn", "900101-1234567"),  # hyphenated, date valid: the check digit is not needed
        ("주민등록번호 2110153123450을 입력", "kr_rrn", "2110153123450"),  # no hyphen, no check digit: the context word decides
        ("주민번호 ９００１０１－１２３４５６８", "kr_rrn", "９００１０１－１２３４５６８"),  # full-width
        ("외국인등록번호 850315-5123458", "kr_frn", "850315-5123458"),
        ("ARN 8503155123450", "kr_frn", "8503155123450"),  # the foreigners' second check-digit formula
        ("등록번호 210704-7123456으로 신청", "kr_frn", "210704-7123456"),
        ("사업자등록번호 123-45-67891", "kr_brn", "123-45-67891"),
        ("사업자번호 2208112341로 발행", "kr_brn", "2208112341"),
        ("여권번호 M12345678입니다", "passport", "M12345678"),
        ("passport no. S87654321", "passport", "S87654321"),
        ("새 여권 M123A4567", "passport", "M123A4567"),
        ("M001B2345 들고 공항 가요", "passport", "M001B2345"),  # the 2021 format needs no context word
        ("국민은행 123456-01-123456로 입금", "bank_account", "123456-01-123456"),
        ("계좌 110-123-456789로 송금했어요", "bank_account", "110-123-456789"),
        ("카카오뱅크 3333-01-1234567", "bank_account", "3333-01-1234567"),
        ("wire it to account 1002-123-456789", "bank_account", "1002-123-456789"),
        ("카드번호 4111-1111-1111-1111로 결제", "credit_card", "4111-1111-1111-1111"),
        ("대표번호 1588-1234로 전화", "phone", "1588-1234"),
        ("옛날 번호 011-234-5678이야", "phone", "011-234-5678"),
        ("인터넷전화 070-1234-5678", "phone", "070-1234-5678"),
        ("+82-2-312-4567 사무실", "phone", "+82-2-312-4567"),
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
        "9001011234567 wrong check digit, no hyphen and no context word",
        "901301-1234565 month 13",
        "900101-9234560 gender digit 9",
        "991231-3234567 born in 2099",
        "주문번호 240115-1234567 배송 시작",  # a reference word is the closest context word
        "파일명 240115-1234567.jpg",
        "사업자등록번호 123-45-67890",  # wrong check digit
        "모델명 M12345678, 재고 없음",  # the old passport format needs a passport word
        "계좌 개설은 2024-01-15, 이체 한도 5,000,000원",
        "110-123-456789 on its own",
        "이체 확인번호 12345678901234",
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
        ("kr_frn", "850315-5123458", "850315-5******"),
        ("kr_brn", "123-45-67891", "123-**-*****"),
        ("passport", "M123A4567", "M********"),
        ("bank_account", "110-123-456789", "***-***-**6789"),
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


NONE = dict.fromkeys(KINDS, 0)
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
    assert report["counts"] == {**NONE, "kr_rrn": 1, "email": 1, "ip_address": 1, "phone": 4}
    assert list(report["counts"]) == list(KINDS)
    assert report["by_column"] == {
        "messages": {**NONE, "kr_rrn": 1, "email": 1, "phone": 4},
        "note": {**NONE, "ip_address": 1},
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
    assert counts == {**NONE, "kr_rrn": 1, "email": 1, "ip_address": 1, "phone": 4}
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


def test_overlaps_between_korean_kinds_go_to_the_more_specific_one():
    # A phone number next to an account word stays a phone number; an RRN is never an account.
    text = "입금 확인되면 010-1234-5678로 문자 주세요. 계좌 900101-1234568"
    assert kinds_and_values(text) == [("phone", "010-1234-5678"), ("kr_rrn", "900101-1234568")]
    assert kinds_and_values("계좌 말고 사업자번호 123-45-67891") == [("kr_brn", "123-45-67891")]  # the closer word wins
    assert kinds_and_values("계좌 123-45-67891") == [("bank_account", "123-45-67891")]


def test_find_pii_restricted_to_kinds_is_the_same_matches_filtered():
    text = "계좌 110-123-456789, 휴대폰 010-1234-5678, 주민번호 900101-1234568, a@b.io"
    assert kinds_and_values(text) == [("bank_account", "110-123-456789"), ("phone", "010-1234-5678"),
                                      ("kr_rrn", "900101-1234568"), ("email", "a@b.io")]
    assert [m.kind for m in find_pii(text, ["kr_rrn"])] == ["kr_rrn"]
    assert [m.value for m in find_pii(text, {"bank_account"})] == ["110-123-456789"]  # the phone is not an account
    assert find_pii(text, []) == []
    with pytest.raises(ValueError, match="unknown PII kinds"):
        find_pii(text, ["rrn"])  # kinds, not aliases: detector() resolves those


def test_mask_text_masks_only_the_kinds_asked_for():
    text = "주민번호 900101-1234568, 전화 010-1234-5678"
    assert mask_text(text, ["kr_rrn"]) == ("주민번호 [KR_RRN], 전화 010-1234-5678", Counter({"kr_rrn": 1}))
    assert mask_text(text)[0] == "주민번호 [KR_RRN], 전화 [PHONE]"


@pytest.mark.parametrize("name, kind", [
    ("rrn", "kr_rrn"), ("frn", "kr_frn"), ("brn", "kr_brn"), ("card", "credit_card"), ("account", "bank_account"),
    ("RRN", "kr_rrn"), (" phone ", "phone"), *[(kind, kind) for kind in KINDS],
])
def test_detector_resolves_short_names_and_kinds(name, kind):
    assert detector(name) == kind


def test_detector_refuses_an_unknown_name_listing_the_valid_ones():
    with pytest.raises(InvalidRequest) as refused:
        detector("ssn")
    assert refused.value.param == "pii" and refused.value.status == 400
    assert "unknown PII detector 'ssn'" in refused.value.message
    assert "kr_rrn (rrn)" in refused.value.message and "bank_account (account)" in refused.value.message


KOREAN_KINDS = ("kr_rrn", "kr_frn", "kr_brn", "passport", "bank_account", "credit_card", "phone")


def test_corpus_precision_and_recall_stay_above_their_floors():
    rows = load_corpus()
    table, mistakes = score(rows)
    assert sum(not row["spans"] for row in rows) >= 150, "hard negatives"
    for kind in KOREAN_KINDS:
        assert table[kind]["labelled"] >= 40, kind
        assert table[kind]["precision"] >= 0.95 and table[kind]["recall"] >= 0.95, (kind, table[kind], mistakes)
    for kind in ("secret", "email", "ip_address"):
        assert table[kind]["labelled"] >= 4 and table[kind]["precision"] == table[kind]["recall"] == 1.0, mistakes


def test_a_chat_message_full_of_numbers_but_without_personal_data_has_none():
    """Dates, amounts, versions and percentages are not personal data (its speed: bench/pii_accuracy.py --speed)."""
    message = ("안녕하세요, 지난주 회의에서 논의한 Q3 로드맵 관련해서 여쭤볼게요. The onboarding flow ships on 2024-11-15, "
               "서버 비용이 월 3,500,000원인데 20% 줄일 수 있을까요? We scaled to 4 replicas and p99 went to 350ms. ") * 2
    assert find_pii(message) == []
