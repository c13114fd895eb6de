"""Personal data and secrets in text: find, mask, and scan or mask whole tables.

Each kind has a regex that finds candidates and a check that confirms them (birth date and
check digit, Luhn and issuer prefix, phonenumbers, ipaddress), so dates, versions and
order numbers are not flagged. Kinds whose shape alone says little (bank accounts, old
passports, bare 13-digit runs) also need a context word nearby: the closest context word
within a short window decides, and words such as 주문번호 or "tracking" speak against.
Where matches overlap, the more specific kind wins, in the order of KINDS. docs/pii.md
states every rule; bench/pii_accuracy.py measures them on tests/pii_corpus/.

Ordinary chat text must cost little (bench/policy_micro.py): a text without a digit, an
"@" or a secret's prefix is passed over after a few byte and substring tests; a numeric
detector runs only when the text's runs of digits could make one of its values, and only
over the stretch from the first digit to the last. Boundaries are ASCII-only lookarounds,
never \\b, so Korean particles right after a value ("010-1234-5678로", "…-1234567이야") do
not hide it. Full-width digits and dashes count as ASCII ones.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import msgspec
import phonenumbers
import pyarrow as pa
from stdnum import luhn

from appliance.errors import InvalidRequest

SECRET = "secret"
KR_RRN = "kr_rrn"
KR_FRN = "kr_frn"
KR_BRN = "kr_brn"
CREDIT_CARD = "credit_card"
PASSPORT = "passport"
EMAIL = "email"
IP_ADDRESS = "ip_address"
PHONE = "phone"
BANK_ACCOUNT = "bank_account"
# The stable list of detectors, most specific first: it decides overlaps.
KINDS = (SECRET, KR_RRN, KR_FRN, KR_BRN, CREDIT_CARD, PASSPORT, EMAIL, IP_ADDRESS, PHONE, BANK_ACCOUNT)
# Short names for the command line and policies, besides the kinds themselves.
ALIASES = {"rrn": KR_RRN, "frn": KR_FRN, "arn": KR_FRN, "brn": KR_BRN, "card": CREDIT_CARD,
           "account": BANK_ACCOUNT, "ip": IP_ADDRESS}


class Match(msgspec.Struct, frozen=True):
    kind: str
    start: int
    end: int
    value: str


def detector(name: str) -> str:
    """The kind that `name` (a kind or one of ALIASES, in any case) stands for."""
    key = name.strip().lower()
    if key in KINDS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    aliases = {kind: ", ".join(a for a, k in ALIASES.items() if k == kind) for kind in KINDS}
    names = ", ".join(f"{kind} ({aliases[kind]})" if aliases[kind] else kind for kind in KINDS)
    raise InvalidRequest(f"unknown PII detector {name!r}: one of {names}", param="pii")


# Each secret pattern with the strings one of which it always holds.
_SECRETS = [
    (("PRIVATE KEY",),
     re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----(?:[\s\S]*?-----END \1PRIVATE KEY-----)?")),
    (("AKIA", "ASIA"), re.compile(r"(?<![A-Za-z0-9_])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9_])")),
    (("gh", "github_pat_"),
     re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})")),
    (("xox",), re.compile(r"(?<![A-Za-z0-9_-])xox[abprs]-[A-Za-z0-9-]{10,}")),
    (("AIza",), re.compile(r"(?<![A-Za-z0-9_-])AIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])")),
    (("eyJ",), re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")),
]
# Tokens whose prefix alone is a common word start: they must also look random.
_SK_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])(sk-[A-Za-z0-9_-]{20,})")  # OpenAI and this appliance (sk-ap-...)
_BEARER_TOKEN = re.compile(r"(?<![A-Za-z0-9_])(?i:bearer)\s+([A-Za-z0-9._~+/-]{16,}=*)")

# Gates: every numeric kind but IP addresses holds a run of 5 digits, or two groups of 3
# digits or more with a separator between, or (new passports) 3 digits, a letter, 4 digits.
# _NUMBER_GATE is read on a text with full-width forms or dashes, _NUMBER_SHAPE on any other.
_DIGIT_CLASS = "[0-9\uff10-\uff19]"
_NUMBER_GATE = re.compile(f"{_DIGIT_CLASS}{{3}}(?:{_DIGIT_CLASS}{{2}}|[ .)\\-\uff0d\u2010-\u2013\u2212]{{1,2}}"
                          f"{_DIGIT_CLASS}{{3}}|[A-Z]{_DIGIT_CLASS}{{4}})")
# Written to start with a literal, which the regex engine skips to: a digit, a dot, 1 to 3 digits, a dot, a digit.
_DOTTED_GATE = re.compile(r"\.(?<=[0-9]\.)[0-9]{1,3}\.[0-9]")
_FULL_WIDTH_DIGIT = re.compile("[\uff10-\uff19]")
_UNUSUAL = re.compile("[\uff10-\uff19\uff0d\uff0b\uff08\uff09\u2010-\u2013\u2212]")
# Same length in and out, so positions in the translated text are positions in the original.
_TO_ASCII = str.maketrans({**{chr(0xFF10 + n): str(n) for n in range(10)}, "\uff0b": "+", "\uff08": "(",
                           "\uff09": ")", **dict.fromkeys("\uff0d\u2010\u2011\u2012\u2013\u2212", "-")})

# The gates mostly read a text's "marks": its UTF-8 bytes, one bytes.translate away: "0" for a
# digit, "." for a dot, "s" for the number gate's other separators (space, ")" and "-"), "A" for a
# capital, "@" for itself, "!" for the lead byte of U+2000-2FFF and U+F000-FFFF (where the dashes
# and full-width forms of _UNUSUAL are), "c" for a continuation byte (not a character of its own)
# and "x" for any other byte. Searching the marks is many times faster than searching the text: a
# mark is found with a memchr (`int in bytes`, while `bytes in bytes` first tries its needle as an
# int and that failure costs more), and the patterns on marks start with a literal, which the
# regex engine skips to instead of trying each position.
_ASCII_DIGITS = b"0123456789"
_DIGIT_MARK, _AT_MARK, _WIDE_MARK, _CONTINUATION_MARK = b"0@!c"
_MARKS = bytes(_DIGIT_MARK if byte in _ASCII_DIGITS else byte if byte in b".@" else ord("s") if byte in b" )-"
               else ord("A") if 65 <= byte <= 90 else _WIDE_MARK if byte in (0xE2, 0xEF)
               else _CONTINUATION_MARK if 0x80 <= byte <= 0xBF else ord("x") for byte in range(256))
_NUMBER_SHAPE = re.compile(rb"000(?:00|[.s]{1,2}000|A0000)")  # _NUMBER_GATE on a text without "!"
_RUNS_ONLY = bytes(_DIGIT_MARK if byte == _DIGIT_MARK else 32 for byte in range(256))
_NOT_DIGITS = bytes(byte for byte in range(256) if byte not in _ASCII_DIGITS)
_NO_RUNS = (0, 0, 0, 0)

_END = r"(?![0-9A-Za-z_]|[.-][0-9A-Za-z])"  # not followed by more of the number, nor a file extension
# Birth date YYMMDD, gender and century digit, six more digits; 1-4 resident, 5-8 foreigner.
_REGISTRATION = re.compile(r"(?<![0-9A-Za-z_.-])([0-9]{2}[01][0-9][0-3][0-9])(-?)([1-8])([0-9]{6})" + _END)
_BRN = re.compile(r"(?<![0-9A-Za-z_.-])([0-9]{3})(-?)([0-9]{2})\2([0-9]{5})" + _END)
_PASSPORT = re.compile(r"(?<![0-9A-Za-z_-])[MSRGD](?:([0-9]{8})|[0-9]{3}[A-Z][0-9]{4})(?![0-9A-Za-z_-])")
_CREDIT_CARD = re.compile(
    r"""(?<![0-9A-Za-z_.-])(?:
        [0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{4}(?:\1[0-9]{3})?   # 4-4-4-4, 4-4-4-4-3
      | [0-9]{4}([ -])[0-9]{4}\2[0-9]{4}\2[0-9]{1,3}               # 4-4-4-1 to 4-4-4-3
      | [0-9]{4}([ -])[0-9]{6}\3[0-9]{4,5}                         # American Express, Diners
      | [0-9]{13,19}
    )(?![0-9A-Za-z_])""",
    re.X,
)
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9_-])"
)
_IPV4 = re.compile(r"(?<![0-9A-Za-z_.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9A-Za-z_]|\.[0-9])")
_IPV6 = re.compile(
    r"(?<![0-9A-Za-z_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{1,4})?(?:%[0-9A-Za-z]+)?(?![0-9A-Za-z_:]|\.[0-9])"
)
_PHONE = re.compile(
    r"""(?<![0-9A-Za-z_+.-])
        (?:\+[0-9]{1,3}[ .-]?)?       # country code
        \(?[0-9]{1,4}\)?              # area code or mobile prefix
        (?:[ .-]?[0-9]{3,4}){1,3}     # the rest, in groups
        (?![0-9A-Za-z_]|[.-][0-9])""",
    re.X,
)
_SERVICE_NUMBER = re.compile(r"1[5-9][0-9]{2}-[0-9]{4}")  # 1588-1234: only written with its hyphen
_ACCOUNT = re.compile(r"(?<![0-9A-Za-z_.-])(?:[0-9]{2,6}(?:-[0-9]{1,7}){1,3}|[0-9]{10,14})" + _END)
_DIGIT = re.compile(r"[0-9]")
# Issuer ranges (IIN): Visa, Mastercard, Maestro and the 6 series, Amex, Diners, JCB.
_CARD_PREFIXES = re.compile(r"4|5|6|3[46-9]|30[0-5]|35(?:2[89]|[3-8][0-9])|2(?:22[1-9]|2[3-9][0-9]|[3-6][0-9]{2}|7[01][0-9]|720)")


def _words(korean: str, english: str = "", acronyms: str = "") -> re.Pattern:
    """Context words: Korean ones anywhere, English ones at a word start in any case, acronyms whole and in capitals.

    Before the English words, a lookahead for their first letters (in either case, and the four
    letters beyond ASCII that match ASCII ones when case is ignored: İ ı ſ K) changes no match but
    spares trying every word, case folded, at each position: most of the cost of a context check."""
    parts = [korean]
    if english:
        initials = "".join(sorted({word[0] for word in english.split("|")}))
        parts.append(f"(?<![A-Za-z])(?=[{initials}{initials.upper()}\u0130\u0131\u017f\u212a])(?i:{english})")
    if acronyms:
        parts.append(f"(?<![A-Za-z])(?:{acronyms})(?![A-Za-z])")
    return re.compile("|".join(parts))


_IDENTITY_WORDS = _words("주민|외국인|신분증", "resident|alien regist|foreigner|national id", "RRN|ARN|FRN")
_BUSINESS_WORDS = _words("사업자|법인", "business regist|business number|company regist|tax id|tax regist", "BRN")
_PASSPORT_WORDS = _words("여권", "passport")
_ACCOUNT_WORDS = _words("계좌|입금|송금|이체|예금주|출금|은행|뱅크|신한|농협|우체국|새마을금고|신협|수협|카뱅|토스",
                        "account|bank|deposit|wire|transfer|remit|routing", "KB|NH|IBK|SC|IBAN")
_CARD_WORDS = _words("카드|결제|신용|체크", "card|visa|master|amex|credit|debit|pay")
_PHONE_WORDS = _words("전화|연락|휴대|핸드폰|폰|문자|팩스|콜", "phone|mobile|cell|call|tel|fax|contact")
# Words that say a number is a reference, not a person's: they speak against the kinds above.
_REFERENCE_WORDS = _words("주문|송장|운송장|택배|배송|접수번호|예약번호|승인번호|확인번호|조회번호|거래번호|일련|시리얼|제품|"
                          "모델|품번|부품|사건|문서|티켓|회원번호|고객번호|계약번호|증권번호|관리번호|인증번호|쿠폰|바코드",
                          "order|invoice|tracking|shipment|parcel|ticket|serial|booking|reservation|transaction|"
                          "reference|ref|case|model|product|part|sku|isbn|barcode|ean|imei|coupon|otp|code|token",
                          "ID|id")
_BEFORE, _AFTER = 30, 20  # the context window, in characters either side


def find_pii(text: str, kinds: Iterable[str] | None = None) -> list[Match]:
    """Every piece of personal data or secret in `text`, in order, without overlaps.

    With `kinds`, only those (the same matches as without, filtered: a phone number is
    never masked as a bank account because phone numbers were not asked for).
    """
    wanted, plan = _plan(_KIND_SET if kinds is None else frozenset(kinds))
    if not wanted:
        return []
    gate = _gate(text)
    if gate is None:
        return []
    marks, wide, digits = gate
    if wide:
        has_number = digits and _NUMBER_GATE.search(text) is not None
        checked = text.translate(_TO_ASCII) if has_number and _UNUSUAL.search(text) else text
        if checked is not text:
            marks = _marks(checked)
    else:
        has_number, checked = digits and _NUMBER_SHAPE.search(marks) is not None, text
    runs, start, end = (_digit_runs(marks), *_digits_span(marks, len(checked))) if has_number else (_NO_RUNS, 0, 0)
    left = sum(runs)  # digits outside the matches kept: a numeric match holds some and may overlap no kept one
    found: list[Match] = []
    for numeric, needs, find in plan:
        if numeric and not left or needs is not None and not needs(runs, checked):
            continue  # it could find nothing (that is kept)
        for match in find(checked, found, start, end) if numeric else find(checked, found):
            if not _overlaps(found, match.start, match.end):
                found.append(match)
                if left:
                    left -= _count_digits(match.value)
    chosen = [match for match in found if match.kind in wanted]
    if checked is not text:
        chosen = [Match(m.kind, m.start, m.end, text[m.start : m.end]) for m in chosen]
    if len(chosen) > 1:
        chosen.sort(key=lambda match: match.start)
    return chosen


def mask_text(text: str, kinds: Iterable[str] | None = None) -> tuple[str, Counter]:
    """`text` with each match (of `kinds`, or every kind) replaced by a placeholder such as [EMAIL]; counts by kind."""
    matches = find_pii(text, kinds)
    pieces, last = [], 0
    for match in matches:
        pieces += [text[last : match.start], f"[{match.kind.upper()}]"]
        last = match.end
    pieces.append(text[last:])
    return "".join(pieces), Counter(match.kind for match in matches)


def redact_sample(kind: str, value: str) -> str:
    """`value` partly hidden, for reports that must not repeat it."""
    if kind == EMAIL:
        local, _, domain = value.partition("@")
        return f"{local[0]}***@{domain}"
    if kind == PHONE:
        first_group = re.match(r"\+?\(?([0-9]+)", value).group(1)
        return _hide_digits(value, keep_first=min(len(first_group), 3), keep_last=4)
    if kind in (KR_RRN, KR_FRN):
        return _hide_digits(value, keep_first=7, keep_last=0)
    if kind == KR_BRN:
        return _hide_digits(value, keep_first=3, keep_last=0)
    if kind in (CREDIT_CARD, BANK_ACCOUNT):
        return _hide_digits(value, keep_first=0, keep_last=4)
    if kind == PASSPORT:
        return value[0] + "*" * (len(value) - 1)
    if kind == IP_ADDRESS:
        if ":" in value:
            return ":".join(value.split(":")[:2]) + ":…"
        return ".".join(value.split(".")[:2]) + ".*.*"
    if kind == SECRET:
        return value.split("\n")[0] + "…" if value.startswith("-----BEGIN") else value[:4] + "…"
    raise ValueError(f"unknown PII kind {kind!r}: one of {', '.join(KINDS)}")


def scan_table(table: pa.Table, samples_per_kind: int = 5) -> dict:
    """Counts of personal data in every string of `table`, nested ones included, with redacted samples."""
    counts = Counter()
    by_column: dict[str, Counter] = {}
    samples: list[dict] = []
    rows_with_pii: set[int] = set()
    for name, column in zip(table.column_names, table.columns):
        if not _holds_text(column.type):
            continue
        for row, value in enumerate(column.to_pylist()):
            for path, text in _strings(value, name):
                for match in find_pii(text):
                    counts[match.kind] += 1
                    by_column.setdefault(name, Counter())[match.kind] += 1
                    rows_with_pii.add(row)
                    if counts[match.kind] <= samples_per_kind:
                        value = redact_sample(match.kind, match.value)
                        samples.append({"kind": match.kind, "row": row, "column": name, "path": path, "value": value})
    return {
        "rows_scanned": table.num_rows,
        "rows_with_pii": len(rows_with_pii),
        "counts": _all_kinds(counts),
        "by_column": {name: _all_kinds(column_counts) for name, column_counts in by_column.items()},
        "samples": samples,
    }


def mask_table(table: pa.Table) -> tuple[pa.Table, dict]:
    """`table` with every string (nested ones too) masked, same schema; counts by kind."""
    counts = Counter()

    def masked(value):
        if isinstance(value, str):
            text, found = mask_text(value)
            counts.update(found)
            return text
        if isinstance(value, dict):
            return {key: masked(item) for key, item in value.items()}
        if isinstance(value, list):
            return [masked(item) for item in value]
        if isinstance(value, tuple):  # a map entry
            return tuple(masked(item) for item in value)
        return value

    columns = [
        pa.array([masked(value) for value in column.to_pylist()], column.type) if _holds_text(column.type) else column
        for column in table.columns
    ]
    return pa.Table.from_arrays(columns, schema=table.schema), _all_kinds(counts)


@functools.lru_cache(maxsize=256)
def _plan(wanted: frozenset[str]) -> tuple[frozenset[str], list]:
    """`wanted`, and the detectors to run for it: those of its kinds and of every kind before them,
    whose matches take precedence."""
    if not wanted <= _KIND_SET:
        raise ValueError(f"unknown PII kinds {sorted(wanted - _KIND_SET)}: one of {', '.join(KINDS)}")
    last = max((KINDS.index(kind) for kind in wanted), default=-1)
    return wanted, [(numeric, needs, find) for kinds, numeric, needs, find in _DETECTORS
                    if KINDS.index(kinds[0]) <= last]


def ordinary(text: str) -> bool:
    """Whether no detector can match in `text`: no digit, no "@", nothing a secret starts with."""
    return _gate(text) is None


def _gate(text: str) -> tuple[bytes, bool, bool] | None:
    """None for ordinary text, or else its marks, whether it may hold full-width forms or dashes,
    and whether it holds digits."""
    marks = _marks(text)
    wide = _WIDE_MARK in marks
    digits = _DIGIT_MARK in marks or (wide and _FULL_WIDTH_DIGIT.search(text) is not None)
    if not digits and _AT_MARK not in marks and not _may_hold_secret(text):
        return None
    return marks, wide, digits


def _marks(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass").translate(_MARKS)


def _count_digits(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGITS))


def _digit_runs(marks: bytes) -> list[int]:
    """The lengths of the runs of ASCII digits in a text, from its marks: longest first, then four
    zeros (so that runs[3] is the fourth longest or 0)."""
    runs = list(map(len, marks.translate(_RUNS_ONLY).split()))
    runs.sort(reverse=True)
    runs.extend(_NO_RUNS)
    return runs


def _digits_span(marks: bytes, length: int) -> tuple[int, int]:
    """Where in a text of `length` characters, from its marks, a numeric kind's regex is searched.

    Each starts at a digit or one character before ("+", "(" or a passport's letter), ends with a
    digit, and looks at most two characters past its end: so it finds the same matches between one
    character before the first digit and two after the last as in the whole text (a lookbehind
    still sees what is before)."""
    first, last = marks.find(_DIGIT_MARK), marks.rfind(_DIGIT_MARK)
    first -= marks.count(_CONTINUATION_MARK, 0, first)  # bytes to characters
    last -= marks.count(_CONTINUATION_MARK, 0, last)
    return max(first - 1, 0), min(last + 3, length)


def _overlaps(taken: list[Match], start: int, end: int) -> bool:
    for kept in taken:  # a loop: any() over a generator costs more for the few matches here
        if start < kept.end and kept.start < end:
            return True
    return False


def _context(text: str, start: int, end: int, words: re.Pattern, against: re.Pattern) -> bool | None:
    """Whether the closest context word around text[start:end] is one of `words` (True) or of
    `against` (False); None when the window holds neither. A tie goes to `words`."""
    near, far = _distance(words, text, start, end), _distance(against, text, start, end)
    if near is None and far is None:
        return None
    return far is None or (near is not None and near <= far)


def _distance(words: re.Pattern, text: str, start: int, end: int) -> int | None:
    best = None
    for found in words.finditer(text, max(0, start - _BEFORE), start):
        best = start - found.end()  # the last one before is the closest
    after = words.search(text, end, end + _AFTER)
    if after and (best is None or after.start() - end < best):
        best = after.start() - end
    return best


def _may_hold_secret(text: str) -> bool:
    """Whether secrets are looked for in `text` (written out: a loop over the strings costs twice as much)."""
    return ("sk-" in text or "AKIA" in text or "ASIA" in text or "gh" in text or "github_pat_" in text or "xox" in text
            or "AIza" in text or "eyJ" in text or "PRIVATE KEY" in text or "earer" in text or "EARER" in text)


def _secrets(text: str, taken: list[Match]) -> Iterator[Match]:
    for needles, pattern in _SECRETS:
        if any(needle in text for needle in needles):
            for found in pattern.finditer(text):
                yield Match(SECRET, found.start(), found.end(), found.group())
    for pattern in (_SK_TOKEN, _BEARER_TOKEN) if "sk-" in text else (_BEARER_TOKEN,):
        for found in pattern.finditer(text):
            token = found.group(1)
            if _looks_random(token):
                yield Match(SECRET, found.start(1), found.end(1), token)


def _looks_random(token: str) -> bool:
    """Has a digit, or capitals after the first letter: generated, not a word like 'sk-learn-tutorials'."""
    return bool(_DIGIT.search(token)) or (any(ch.isupper() for ch in token[1:]) and any(ch.islower() for ch in token))


def _registrations(text: str, taken: list[Match], start: int, end: int) -> Iterator[Match]:
    """Resident (kr_rrn, gender digit 1-4) and foreigner (kr_frn, 5-8) registration numbers: a
    real past birth date, and an identity word as the closest context word, or no context word
    and either the hyphen or a valid check digit. Numbers issued since October 2020 carry no
    valid check digit, so the hyphenated form needs none."""
    for found in _REGISTRATION.finditer(text, start, end):
        date, hyphen, gender, rest = found.groups()
        if not _is_past_birth_date(date, gender):
            continue
        foreign = gender >= "5"
        kind = KR_FRN if foreign else KR_RRN
        says = _context(text, found.start(), found.end(), _IDENTITY_WORDS, _REFERENCE_WORDS)
        if says or (says is None and (hyphen or _registration_check_ok(date + gender + rest, foreign))):
            yield Match(kind, found.start(), found.end(), found.group())


def _is_past_birth_date(date: str, gender: str) -> bool:
    century = 1900 if gender in "1256" else 2000
    try:
        born = datetime.date(century + int(date[:2]), int(date[2:4]), int(date[4:]))
    except ValueError:
        return False
    return born < datetime.date.today()


def _registration_check_ok(digits: str, foreign: bool) -> bool:
    """The check digit of numbers issued before October 2020 (foreigners' numbers had two formulas)."""
    total = sum(weight * int(digit) for weight, digit in zip((2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5), digits))
    last = int(digits[12])
    return last == (11 - total % 11) % 10 or (foreign and last == (13 - total % 11) % 10)


def _kr_brns(text: str, taken: list[Match], start: int, end: int) -> Iterator[Match]:
    """Business registration numbers: 3-2-5 digits with a valid check digit; without the
    hyphens, only next to a business word; never when an account word is closer."""
    for found in _BRN.finditer(text, start, end):
        office, hyphen, kind, serial = found.groups()
        digits = office + kind + serial
        if office < "101" or kind == "00" or serial[:4] == "0000" or not _brn_check_ok(digits):
            continue
        says = _context(text, found.start(), found.end(), _BUSINESS_WORDS, _ACCOUNT_WORDS)
        if says or (hyphen and says is None):
            yield Match(KR_BRN, found.start(), found.end(), found.group())


def _brn_check_ok(digits: str) -> bool:
    total = sum(weight * int(digit) for weight, digit in zip((1, 3, 7, 1, 3, 7, 1, 3, 5), digits))
    total += int(digits[8]) * 5 // 10
    return int(digits[9]) == (10 - total % 10) % 10


def _credit_cards(text: str, taken: list[Match], start: int, end: int) -> Iterator[Match]:
    """An issuer prefix and the Luhn check; a bare digit run is dropped when a reference word is
    closer than any card word."""
    for found in _CREDIT_CARD.finditer(text, start, end):
        candidate = found.group()
        digits = re.sub(r"[ -]", "", candidate)
        if not _CARD_PREFIXES.match(digits) or not luhn.is_valid(digits):
            continue
        if candidate.isdigit() and _context(text, found.start(), found.end(), _CARD_WORDS, _REFERENCE_WORDS) is False:
            continue
        yield Match(CREDIT_CARD, found.start(), found.end(), candidate)


def _passports(text: str, taken: list[Match], start: int, end: int) -> Iterator[Match]:
    """Korean passports: M, S, R, G or D then 8 digits (before 2021: only next to a passport
    word), or then 3 digits, a letter and 4 digits (since 2021: unless a reference word is closer)."""
    for found in _PASSPORT.finditer(text, start, end):
        says = _context(text, found.start(), found.end(), _PASSPORT_WORDS, _REFERENCE_WORDS)
        if says or (says is None and not found.group(1)):
            yield Match(PASSPORT, found.start(), found.end(), found.group())


def _emails(text: str, taken: list[Match]) -> Iterator[Match]:
    for found in _EMAIL.finditer(text):
        yield Match(EMAIL, found.start(), found.end(), found.group())


def _ip_addresses(text: str, taken: list[Match]) -> Iterator[Match]:
    if "::" in text or text.count(":") >= 7:  # IPv6 first: it may end in an IPv4 address
        for found in _IPV6.finditer(text):
            if _DIGIT.search(found.group()) and _is_ip(found.group(), ipaddress.IPv6Address):
                yield Match(IP_ADDRESS, found.start(), found.end(), found.group())
    if _DOTTED_GATE.search(text):
        for found in _IPV4.finditer(text):
            if _is_ip(found.group(), ipaddress.IPv4Address):
                yield Match(IP_ADDRESS, found.start(), found.end(), found.group())


def _is_ip(candidate: str, kind: type) -> bool:
    try:
        kind(candidate)
    except ValueError:
        return False
    return True


def _phones(text: str, taken: list[Match], start: int, end: int) -> Iterator[Match]:
    """Numbers phonenumbers finds valid (Korean unless +country): with the trunk 0, a +country
    code, or a 15XX-XXXX service number; a bare digit run is dropped when a reference word is
    closer than any phone word."""
    for found in _PHONE.finditer(text, start, end):
        candidate, (first, last) = found.group(), found.span()
        if _overlaps(taken, first, last) or not _phone_shaped(candidate):
            continue
        if candidate.isdigit() and _context(text, first, last, _PHONE_WORDS, _REFERENCE_WORDS) is False:
            continue
        if _valid_phone(candidate):
            yield Match(PHONE, first, last, candidate)


def _phone_shaped(candidate: str) -> bool:
    if not 8 <= _count_digits(candidate) <= 15:
        return False
    return candidate.lstrip("(").startswith(("0", "+")) or _SERVICE_NUMBER.fullmatch(candidate) is not None


@functools.lru_cache(maxsize=4096)  # a conversation resends the same numbers every turn
def _valid_phone(candidate: str) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(candidate, "KR"))
    except phonenumbers.NumberParseException:
        return False


def _bank_accounts(text: str, taken: list[Match], start: int, end: int) -> Iterator[Match]:
    """10 to 14 digits, bare or in hyphenated groups (a first group of at most 6), with a
    bank or account word closer than any reference word."""
    for found in _ACCOUNT.finditer(text, start, end):
        candidate = found.group()
        if not 10 <= len(candidate) - candidate.count("-") <= 14 or _overlaps(taken, found.start(), found.end()):
            continue
        if _context(text, found.start(), found.end(), _ACCOUNT_WORDS, _REFERENCE_WORDS):
            yield Match(BANK_ACCOUNT, found.start(), found.end(), candidate)


# Which kinds each detector finds, whether it is numeric (needs the number gate, and is given the
# span to search, _digits_span), what the text (and for a numeric kind the runs of digits,
# _digit_runs) must be for it to find anything (None: it tells itself), and the detector. A
# detector is given the matches kept so far, to skip costly checks on candidates they cover.
_DETECTORS: list[tuple[tuple[str, ...], bool, Callable[[list[int], str], bool] | None,
                       Callable[..., Iterator[Match]]]] = [
    ((SECRET,), False, lambda runs, text: _may_hold_secret(text), _secrets),
    ((KR_RRN, KR_FRN), True, lambda runs, text: runs[0] >= 7, _registrations),  # 6 + 7, or 13
    ((KR_BRN,), True, lambda runs, text: runs[0] >= 5, _kr_brns),  # 3-2-5, or 10
    # 4-4-4-1 to 4-4-4-4-3 and 4-6-4(5): 3 groups of 4 or more; or 13 to 19 in one run
    ((CREDIT_CARD,), True, lambda runs, text: runs[2] >= 4 or runs[0] >= 13, _credit_cards),
    # a letter, then 8 digits or 3 and 4
    ((PASSPORT,), True, lambda runs, text: runs[0] >= 4 and ("M" in text or "S" in text or "R" in text
                                                             or "G" in text or "D" in text), _passports),
    ((EMAIL,), False, lambda runs, text: "@" in text, _emails),
    ((IP_ADDRESS,), False, None, _ip_addresses),
    ((PHONE,), True, lambda runs, text: sum(runs) >= 8, _phones),
    ((BANK_ACCOUNT,), True, lambda runs, text: sum(runs) >= 10, _bank_accounts),
]
assert tuple(kind for kinds, _, _, _ in _DETECTORS for kind in kinds) == KINDS
_KIND_SET = frozenset(KINDS)


def _hide_digits(value: str, *, keep_first: int, keep_last: int) -> str:
    total = len(_DIGIT.findall(value))
    out, seen = [], 0
    for ch in value:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen <= keep_first or seen > total - keep_last else "*")
        else:
            out.append(ch)
    return "".join(out)


def _holds_text(arrow_type: pa.DataType) -> bool:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return True
    if pa.types.is_dictionary(arrow_type):
        return _holds_text(arrow_type.value_type)
    if pa.types.is_map(arrow_type):
        return _holds_text(arrow_type.key_type) or _holds_text(arrow_type.item_type)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _holds_text(arrow_type.value_type)
    if pa.types.is_struct(arrow_type):
        return any(_holds_text(field.type) for field in arrow_type)
    return False


def _strings(value, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside `value` with its path, like messages[1].content."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def _all_kinds(counts: Counter) -> dict[str, int]:
    return {kind: counts[kind] for kind in KINDS}
