"""Personal data and secrets in text: find, mask, and scan or mask whole tables.

Each kind has a regex that finds candidates and a check that confirms them (date and
check digit, Luhn and issuer prefix, phonenumbers, ipaddress), so dates, versions and
order numbers are not flagged. One cheap regex skips text that cannot hold any kind.
Where matches overlap, the more specific kind wins, in the order of KINDS.

Boundaries are ASCII-only, so Korean particles written right after a value
("010-1234-5678로") do not hide it. Phone numbers without a +country code must start with
the trunk prefix 0, as Korean numbers are written at home.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterator

import msgspec
import phonenumbers
import pyarrow as pa
from stdnum import luhn
from stdnum.kr import rrn

SECRET = "secret"
KR_RRN = "kr_rrn"
CREDIT_CARD = "credit_card"
EMAIL = "email"
IP_ADDRESS = "ip_address"
PHONE = "phone"
KINDS = (SECRET, KR_RRN, CREDIT_CARD, EMAIL, IP_ADDRESS, PHONE)  # most specific first


class Match(msgspec.Struct, frozen=True):
    kind: str
    start: int
    end: int
    value: str


_SECRET_HINT = r"sk-|AKIA|ASIA|gh[pousr]_|github_pat_|xox[abprs]-|AIza|eyJ|PRIVATE KEY|(?i:bearer)"
_MAYBE_SECRET = re.compile(_SECRET_HINT)
_MAYBE_PII = re.compile(r"[0-9@]|" + _SECRET_HINT)

_SECRETS = [
    re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----(?:[\s\S]*?-----END \1PRIVATE KEY-----)?"),
    re.compile(r"(?<![A-Za-z0-9_])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9_])"),
    re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    re.compile(r"(?<![A-Za-z0-9_-])xox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"(?<![A-Za-z0-9_-])AIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])"),
    re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
]
# Tokens whose prefix alone is a common word start: they must also look random.
_RANDOM_LOOKING_SECRETS = [
    re.compile(r"(?<![A-Za-z0-9_-])(sk-[A-Za-z0-9_-]{20,})"),  # OpenAI and this appliance (sk-ap-...)
    re.compile(r"(?i:\bbearer)\s+([A-Za-z0-9._~+/-]{16,}=*)"),
]
_KR_RRN = re.compile(r"(?<![0-9A-Za-z_])[0-9]{6}-?[1-8][0-9]{6}(?![0-9A-Za-z_])")
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
_DIGIT = re.compile(r"[0-9]")
# Issuer ranges (IIN): Visa, Mastercard, Maestro and the 6 series, Amex, Diners, JCB.
_CARD_PREFIXES = re.compile(r"4|5|6|3[46-9]|30[0-5]|35(?:2[89]|[3-8][0-9])|2(?:22[1-9]|2[3-9][0-9]|[3-6][0-9]{2}|7[01][0-9]|720)")


def find_pii(text: str) -> list[Match]:
    """Every piece of personal data or secret in `text`, in order, without overlaps."""
    if not _MAYBE_PII.search(text):
        return []
    found: list[Match] = []
    for find in (_secrets, _kr_rrns, _credit_cards, _emails, _ip_addresses, _phones):
        for match in find(text):
            if not any(match.start < kept.end and kept.start < match.end for kept in found):
                found.append(match)
    return sorted(found, key=lambda match: match.start)


def mask_text(text: str) -> tuple[str, Counter]:
    """`text` with each match replaced by a placeholder such as [EMAIL]; counts by kind."""
    matches = find_pii(text)
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
    if kind == KR_RRN:
        return _hide_digits(value, keep_first=7, keep_last=0)
    if kind == CREDIT_CARD:
        return _hide_digits(value, keep_first=0, keep_last=4)
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


def _secrets(text: str) -> Iterator[Match]:
    if not _MAYBE_SECRET.search(text):
        return
    for pattern in _SECRETS:
        for found in pattern.finditer(text):
            yield Match(SECRET, found.start(), found.end(), found.group())
    for pattern in _RANDOM_LOOKING_SECRETS:
        for found in pattern.finditer(text):
            token = found.group(1)
            if _looks_random(token):
                yield Match(SECRET, found.start(1), found.end(1), token)


def _looks_random(token: str) -> bool:
    """Has a digit, or capitals after the first letter: generated, not a word like 'sk-learn-tutorials'."""
    return bool(_DIGIT.search(token)) or (any(ch.isupper() for ch in token[1:]) and any(ch.islower() for ch in token))


def _kr_rrns(text: str) -> Iterator[Match]:
    for found in _KR_RRN.finditer(text):
        if rrn.is_valid(found.group(), allow_future=False):
            yield Match(KR_RRN, found.start(), found.end(), found.group())


def _credit_cards(text: str) -> Iterator[Match]:
    for found in _CREDIT_CARD.finditer(text):
        digits = re.sub(r"[ -]", "", found.group())
        if _CARD_PREFIXES.match(digits) and luhn.is_valid(digits):
            yield Match(CREDIT_CARD, found.start(), found.end(), found.group())


def _emails(text: str) -> Iterator[Match]:
    if "@" in text:
        for found in _EMAIL.finditer(text):
            yield Match(EMAIL, found.start(), found.end(), found.group())


def _ip_addresses(text: str) -> Iterator[Match]:
    if "::" in text or text.count(":") >= 7:  # IPv6 first: it may end in an IPv4 address
        for found in _IPV6.finditer(text):
            if _DIGIT.search(found.group()) and _is_ip(found.group(), ipaddress.IPv6Address):
                yield Match(IP_ADDRESS, found.start(), found.end(), found.group())
    for found in _IPV4.finditer(text):
        if _is_ip(found.group(), ipaddress.IPv4Address):
            yield Match(IP_ADDRESS, found.start(), found.end(), found.group())


def _is_ip(candidate: str, kind: type) -> bool:
    try:
        kind(candidate)
    except ValueError:
        return False
    return True


def _phones(text: str) -> Iterator[Match]:
    for found in _PHONE.finditer(text):
        candidate = found.group()
        digits = len(_DIGIT.findall(candidate))
        if not 8 <= digits <= 15 or not candidate.lstrip("(").startswith(("0", "+")):
            continue
        try:
            number = phonenumbers.parse(candidate, "KR")
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            yield Match(PHONE, found.start(), found.end(), candidate)


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
