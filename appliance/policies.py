"""The policy engine of the hot path: PII, content deny lists and prompt-injection heuristics
applied to the text a request carries (and PII masking of answers).

`inspect` walks the text fields of a chat, completions, embeddings or responses body.
PII found by a detector whose action is "block", a deny-list entry or an injection rule
whose action is "block" raises PolicyViolation naming the rule and the JSON path; "mask"
replaces the value with its placeholder ([KR_RRN]) in a copy of the body; "flag" lets the
request go on with a finding for the audit log. Matchers are compiled once per policy.
docs/policies.md describes the rules and their limits.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache

import msgspec

from appliance import pii
from appliance.errors import InvalidRequest, PolicyViolation
from appliance.governance import ALL_DETECTORS, Policy

ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")
MAX_DENY_ENTRIES = 1000
MAX_DENY_ENTRY_CHARS = 500
MAX_DENY_TOTAL_CHARS = 64 * 1024
REGEX_PREFIX = "re:"
CONTENT_DENY = "content.deny"


class Finding(msgspec.Struct, frozen=True):
    """A flagged rule, for the audit log: which rule, where (a JSON path), and the deny entry if any."""

    rule: str
    param: str
    action: str = "flag"
    detail: str | None = None


class Inspection(msgspec.Struct):
    """What a policy made of a request: the rewritten body if anything was masked (None: forward the
    original bytes), the count of masked values per detector, and the flagged rules."""

    body: dict | None = None
    masked: dict[str, int] = {}
    findings: list[Finding] = []


# --- walking a request body ----------------------------------------------------------

# How injection rules apply to a text: not at all (the application's own system prompt, the
# model's turns, embeddings), all of them (user and tool content), or all but the chat-template
# markers (a completions prompt is a template the application filled in).
NO_INJECTION, INJECTION, INJECTION_NO_MARKERS = 0, 1, 2
_INJECTED_ROLES = frozenset({"user", "tool", "function"})
_CHAT_PARTS = frozenset({"text"})
_RESPONSES_PARTS = frozenset({"input_text", "output_text"})

Path = tuple[str | int, ...]


def _sites(endpoint: str, body: dict) -> Iterator[tuple[Path, str, int]]:
    """Every text of the request: its path in the body, the text, and how injection rules apply."""
    if endpoint == "chat/completions":
        return _chat(body.get("messages"))
    if endpoint == "completions":
        return _strings(("prompt",), body.get("prompt"), INJECTION_NO_MARKERS)
    if endpoint == "embeddings":
        return _strings(("input",), body.get("input"), NO_INJECTION)
    if endpoint == "responses":
        return _responses(body)
    raise ValueError(f"unknown endpoint {endpoint!r}: one of {', '.join(ENDPOINTS)}")


def _chat(messages) -> Iterator[tuple[Path, str, int]]:
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        scope = INJECTION if message.get("role") in _INJECTED_ROLES else NO_INJECTION
        content = message.get("content")
        if isinstance(content, str):  # the common case, read here rather than by one more generator
            yield ("messages", i, "content"), content, scope
        else:
            yield from _content(("messages", i, "content"), content, scope, _CHAT_PARTS)
        if "tool_calls" in message:
            yield from _tool_call_arguments(("messages", i), message["tool_calls"])


def _tool_call_arguments(at: Path, calls) -> Iterator[tuple[Path, str, int]]:
    """The arguments of the calls an assistant turn made (JSON text, which may carry personal data)."""
    if not isinstance(calls, list):
        return
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            yield (*at, "tool_calls", j, "function", "arguments"), function["arguments"], NO_INJECTION


def _responses(body: dict) -> Iterator[tuple[Path, str, int]]:
    if isinstance(body.get("instructions"), str):
        yield ("instructions",), body["instructions"], NO_INJECTION
    items = body.get("input")
    if isinstance(items, str):
        yield ("input",), items, INJECTION
        return
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            scope = INJECTION if item.get("role") == "user" else NO_INJECTION
            yield from _content(("input", i, "content"), item.get("content"), scope, _RESPONSES_PARTS)
        elif kind == "function_call_output":
            yield from _content(("input", i, "output"), item.get("output"), INJECTION, _RESPONSES_PARTS)
        elif kind == "function_call" and isinstance(item.get("arguments"), str):
            yield ("input", i, "arguments"), item["arguments"], NO_INJECTION


def _content(at: Path, content, scope: int, part_types: frozenset) -> Iterator[tuple[Path, str, int]]:
    """A message's content: a string, or a list of parts whose text parts are read."""
    if isinstance(content, str):
        yield at, content, scope
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in part_types and isinstance(part.get("text"), str):
                yield (*at, j, "text"), part["text"], scope


def _strings(at: Path, value, scope: int) -> Iterator[tuple[Path, str, int]]:
    """A string or a list of strings (a list of token ids is left alone)."""
    if isinstance(value, str):
        yield at, value, scope
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield (*at, i), item, scope


def param_of(path: Path) -> str:
    """A path as the JSON path a client reads: ("messages", 2, "content") -> messages[2].content."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def _rewritten(body: dict, edits: list[tuple[Path, str]]) -> dict:
    """`body` with each path set to its new text: the containers on the way are copied, the rest shared."""
    root = dict(body)
    copies = {id(root)}
    for path, text in edits:
        container = root
        for step in path[:-1]:
            child = container[step]
            if id(child) not in copies:
                child = dict(child) if isinstance(child, dict) else list(child)
                container[step] = child
                copies.add(id(child))
            container = child
        container[path[-1]] = text
    return root


# --- normalising text ------------------------------------------------------------------

_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def normalized(text: str) -> str:
    """What deny entries and injection rules are matched against: NFKC, invisible format characters
    removed, case folded. ASCII text is returned as it is (the matchers ignore case)."""
    if text.isascii():
        return text
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold()


def folded(text: str) -> str:
    """`text` normalized and in lower case, ASCII included: what keywords are looked for in."""
    return text.lower() if text.isascii() else normalized(text)


# --- the content deny list -------------------------------------------------------------

# A Latin (or other cased script's) letter or digit: an entry that starts or ends with one does not
# match inside a longer word. Hangul, kana and CJK ideographs are left out: Korean writes particles
# right after a word ("기밀을"), so a Hangul entry matches as a substring and a Latin entry written
# next to Hangul ("password를") still matches.
_WORD_CHAR = (
    "[^\\W_\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f"
    "\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff]"
)
_WORD_CHAR_RE = re.compile(_WORD_CHAR)
# A group repeated without bound with an unbounded repeat inside, like (a+)+ or (\w*){2,}: on text
# that almost matches, the time grows exponentially. Bounded repeats such as (\d{3}-){2} are fine.
_UNBOUNDED = r"(?:[+*]|\{\d*,\})"
_NESTED_REPEAT = re.compile(rf"\((?:[^()\\]|\\.)*{_UNBOUNDED}(?:[^()\\]|\\.)*\){_UNBOUNDED}")


def _literal_pattern(key: str) -> str:
    """A folded entry as a regex on folded text: a Latin word's edge must not touch another Latin letter."""
    pattern = re.escape(key)
    if _WORD_CHAR_RE.fullmatch(key[0]):
        pattern = f"(?<!{_WORD_CHAR}){pattern}"
    if _WORD_CHAR_RE.fullmatch(key[-1]):
        pattern = f"{pattern}(?!{_WORD_CHAR})"
    return pattern


def check_policy(policy: Policy) -> None:
    """Refuse a policy that cannot be applied (InvalidRequest naming `deny` or `pii`), before it is set."""
    for kind in policy.pii:
        if kind != ALL_DETECTORS and kind not in pii.KINDS:
            # pii.detector refuses an unknown name; an alias (rrn) is stored by its kind's name (kr_rrn)
            raise InvalidRequest(f"A policy names PII detectors by kind: '{pii.detector(kind)}', not '{kind}'.",
                                 param="pii")
    if len(policy.deny) > MAX_DENY_ENTRIES:
        raise InvalidRequest(f"The deny list has {len(policy.deny)} entries; at most {MAX_DENY_ENTRIES}.", param="deny")
    if sum(len(entry) for entry in policy.deny) > MAX_DENY_TOTAL_CHARS:
        raise InvalidRequest(f"The deny list is longer than {MAX_DENY_TOTAL_CHARS} characters in all.", param="deny")
    for entry in policy.deny:
        if len(entry) > MAX_DENY_ENTRY_CHARS:
            raise InvalidRequest(
                f"The deny entry '{entry[:40]}…' is longer than {MAX_DENY_ENTRY_CHARS} characters.", param="deny"
            )
        if entry.startswith(REGEX_PREFIX):
            _check_regex(entry)
        elif not folded(entry).strip():
            raise InvalidRequest("A deny entry is blank: it would match nothing.", param="deny")


def _check_regex(entry: str) -> None:
    source = entry[len(REGEX_PREFIX):]
    try:
        compiled = re.compile(source, re.IGNORECASE)
    except re.error as exc:
        raise InvalidRequest(f"The deny entry '{entry}' is not a valid regular expression: {exc}.", param="deny") from exc
    if compiled.search("") is not None:
        raise InvalidRequest(f"The deny entry '{entry}' matches empty text, so it would match every request.",
                             param="deny")
    if _NESTED_REPEAT.search(source):
        raise InvalidRequest(f"The deny entry '{entry}' repeats a group that itself repeats (like (a+)+), which can"
                             " take exponential time; write it without the nesting.", param="deny")


class _DenyList:
    """Literal entries are looked for as substrings of the folded text with its spaces collapsed (fast)
    and confirmed by their pattern (word edges); regular expressions are searched one by one. A literal
    is looked for only in a text that holds its longest word, and the spaces are collapsed only then."""

    def __init__(self, entries: list[str]):
        self.literals: list[tuple[str, str, re.Pattern, str]] = []
        self.regexes: list[tuple[re.Pattern, str]] = []
        for entry in entries:
            if entry.startswith(REGEX_PREFIX):
                self.regexes.append((re.compile(entry[len(REGEX_PREFIX):], re.IGNORECASE), entry))
            elif key := " ".join(folded(entry).split()):
                longest = max(key.split(" "), key=len)
                self.literals.append((longest, key, re.compile(_literal_pattern(key)), entry))

    def first(self, plain: str, lowered: str) -> str | None:
        """The first entry held by a text, given as `plain` (normalized) and `lowered` (folded)."""
        flat = None
        for longest, key, pattern, entry in self.literals:
            if longest in lowered:  # a word of the entry, without spaces: it is in the text if the entry is
                if flat is None:
                    flat = " ".join(lowered.split())
                if key in flat and pattern.search(flat):
                    return entry
        for regex, entry in self.regexes:
            if regex.search(plain):
                return entry
        return None


# --- prompt-injection heuristics ---------------------------------------------------------

# Each rule is a few phrasings, each a regex on folded text (lower case, NFKC) with the words one of
# which it always holds: a regex runs only on text that has one of its words, which keeps long
# ordinary texts cheap. English phrasings need a qualifier (previous, your, system...) and Korean
# ones a context word, so that ordinary questions about rules, filters, developer mode or system
# prompts are not flagged.
_KO_IMPERATIVE = r"(?:(?:답|대답|응답|답변|말|작성|출력|설명|얘기|이야기)\s*(?:해|하라|하세요|하시오|할\s*것)|알려\s*(?:줘|주|달))"
INJECTION_RULES: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "injection.ignore_instructions": [
        (("ignore", "disregard", "forget", "override", "bypass", "skip", "neglect"),
         r"\b(?:ignore|disregard|forget|override|bypass|skip|neglect)\s+(?:\w+\s+){0,3}?"
         r"(?:previous|prior|above|earlier|preceding|foregoing|original|initial|system|your|developer'?s?)\s+"
         r"(?:\w+\s+){0,2}?(?:instructions?|prompts?|rules|guidelines|directions|directives|commands|programming|orders)\b"
         r"|\b(?:ignore|disregard|forget)\s+(?:all\s+of\s+|everything\s+)?(?:the\s+)?above(?:\s+(?:text|instructions|context))?"
         r"\s*,?\s*(?:and\s+)?(?:then\s+|instead\s+)?(?:say|print|write|output|respond|reply|tell|answer|repeat|translate)\b"),
        (("follow", "obey"),
         r"\b(?:stop|quit|don'?t|do\s+not|no\s+longer)\s+(?:following|follow|obeying|obey)\s+(?:\w+\s+){0,2}?"
         r"(?:your|previous|prior|system|original|developer'?s?)\s+(?:\w+\s+)?(?:instructions|rules|guidelines|prompt|programming)\b"),
        (("무시", "잊", "무효"),
         r"(?:이전|앞|위|상기|기존|지금까지|앞서|원래|시스템|너의|네|당신의)(?:의|에서)?\s*(?:(?:모든|주어진|받은|말한|설정된)\s*)*"
         r"(?:지시사항|지시문|지시|명령어|명령|지침|프롬프트|규칙|가이드라인)(?:들)?(?:은|는|을|를|이|가|도)?\s*(?:(?:모두|전부|다)\s*)?"
         r"(?:무시|잊어|잊고|잊으|무효)"),
    ],
    "injection.reveal_system_prompt": [
        (("prompt", "instructions", "message", "directives"),
         r"\b(?:reveal|show|print|display|output|repeat|recite|leak|dump|disclose|expose|spell\s+out|tell|give|share|write\s+out)"
         r"\s+(?:me\s+|us\s+)?(?:\w+\s+){0,3}?(?:your\s+|(?P<determiner>the\s+|this\s+))"
         r"(?:(?:full|entire|complete|exact|original|initial|hidden|secret|real)\s+)*"
         r"(?:system|developer|initial|original|hidden|secret)\s+(?:prompt|instructions|message|directives)\b"
         r"(?(determiner)(?!\s+(?:format|template|example|syntax|engineering|for|in|of|works?)\b))"
         r"|\bwhat\s+(?:is|are|was|were)\s+your\s+(?:(?:full|exact|original|initial|hidden|secret)\s+)*"
         r"(?:system\s+prompt|(?:initial|original|hidden|secret)\s+(?:prompt|instructions))\b"),
        (("verbatim",),
         r"\b(?:repeat|print|output|recite)\s+(?:\w+\s+){0,2}?(?:text|words|instructions|everything)\s+(?:above|before\s+this)\s+verbatim\b"),
        (("프롬프트", "지시", "지침", "텍스트"),
         r"(?:시스템|초기|원래|숨겨진|비밀|너의|네|당신의|(?:너|당신)(?:에게|한테)\s*(?:주어진|입력된|설정된))\s*(?:시스템\s*)?"
         r"(?:프롬프트|지시사항|지시문|지시|지침)(?:를|을|은|는|이|가)?\s*(?:(?:그대로|전부|모두|전체|원문)\s*)*"
         r"(?:보여|알려|출력|말해|공개|누설|읊어|적어|나열)"
         r"|(?:위|앞|이전)(?:의|에\s*있는)?\s*(?:지시사항|지시|프롬프트|텍스트)(?:를|을)?\s*(?:그대로|전부|모두)\s*(?:출력|반복|복사|보여)"),
    ],
    "injection.role_override": [
        (("jailbr", "unrestricted", "unfiltered", "uncensored", "unchained", "unbound", "evil", "free", "longer", "dan",
          "anything"),
         r"\byou(?:\s+are|'re)\s+(?:now\s+)?(?:an?\s+)?(?:jailbroken|unrestricted|unfiltered|uncensored|unchained|unbound|"
         r"evil\s+(?:ai|assistant|bot)|free\s+(?:from|of)\s+(?:all\s+|any\s+|your\s+)?"
         r"(?:rules|restrictions|limitations|guidelines|constraints|filters)|"
         r"no\s+longer\s+(?:an?\s+ai|bound|restricted|limited|chatgpt|an?\s+assistant))\b"
         r"|\byou\s+are\s+now\s+dan\b|\bact\s+as\s+(?:an?\s+)?(?:dan|unrestricted|unfiltered|uncensored|jailbroken)\b"
         r"|\b(?:do\s+anything\s+now|dan\s+mode|jailbreak\s+mode)\b"),
        (("developer",),
         r"\b(?:you\s+are|you're|you\s+will|act|respond|answer|reply|stay|remain|operate)\s+(?:now\s+)?"
         r"(?:(?:act|respond|answer|reply)\s+)?(?:in|with)\s+developer\s+mode\b"
         r"|\b(?:chatgpt|assistant|ai|model)\s+with\s+developer\s+mode\b"),
        (("restriction", "rules", "limit", "guideline", "filter", "moral", "ethic", "censor"),
         r"\byou\s+are\s+(?:now\s+)?an?\s+(?:ai|assistant|chatbot|model|bot)\s+(?:with\s+no|without)\s+(?:any\s+)?(?:\w+\s+)?"
         r"(?:restrictions|rules|limits|limitations|guidelines|filters|morals|ethics|censorship)\b"
         r"|\bpretend\s+(?:that\s+)?(?:you\s+(?:are|have)|to\s+be)\s+(?:an?\s+)?(?:ai\s+)?(?:with\s+)?(?:no|without)\s+(?:\w+\s+)?"
         r"(?:restrictions|rules|limits|limitations|guidelines|filters|morals|ethics)\b"),
        (("지금부터", "이제부터", "앞으로", "오늘부터"),
         r"(?:지금부터|이제부터|앞으로|오늘부터)\s*(?:너는|넌|당신은|니가|네가)\s*[^.!?\n]{0,30}?"
         r"(?:제한|제약|규칙|검열|필터|윤리|도덕|가이드라인|dan|탈옥)(?:이|가|도|을|를|에|은|는)?\s*"
         r"(?:없는|없이|받지\s*않는|벗어난|무시하는|없어|풀린|해제된|상관없는)"),
        (("지금부터", "이제부터", "너는", "넌", "당신은", "개발자"),
         r"(?:지금부터|이제부터|너는|넌|당신은)\s*[^.!?\n]{0,20}?(?:dan|탈옥된|탈옥\s*모드|개발자\s*모드|제한\s*없는\s*(?:ai|인공지능|모드|챗봇))"
         r"|개발자\s*모드(?:로|에서)\s*(?:답|대답|응답|행동)"),
    ],
    "injection.disable_safety": [
        (("safety", "polic", "filter", "guardrail", "restriction", "safeguard", "censor", "limit", "moral", "ethic", "guideline",
          "rules"),
         r"\b(?:disable|turn\s+off|switch\s+off|deactivate|bypass|circumvent|ignore|remove|drop|lift|suspend|override)\s+"
         r"(?:all\s+(?:of\s+)?)?(?:your|its)\s+(?:\w+\s+){0,2}?(?:safety|content\s+polic(?:y|ies)|filters?|guardrails?|restrictions|"
         r"safeguards|censorship|limitations|morals?|morality|ethics|ethical\s+\w+)\b"
         r"|\b(?:answer|respond|reply|write|speak|talk|act|continue)\s+(?:\w+\s+){0,3}?without\s+(?:any\s+)?(?:restrictions|filters?|"
         r"filtering|censorship|limitations|guardrails|safety\s+\w+|moral\s+\w+|ethical\s+\w+|content\s+polic(?:y|ies))\b"
         r"|\byou\s+(?:have|with)\s+no\s+(?:\w+\s+)?(?:restrictions|filters|guidelines|limits|limitations|rules|morals|ethics|censorship)\b"),
        (("제한", "제약", "검열", "필터", "가이드라인", "지침", "기준", "원칙", "규칙", "판단", "정책"),
         r"(?:제한|제약|검열|필터링|필터)(?:이|도|을|를)?\s*(?:없이|하지\s*말고|무시하고)\s*(?:\S+\s*){0,2}?" + _KO_IMPERATIVE +
         r"|(?:(?:윤리|윤리적|도덕|도덕적)(?:인)?\s*(?:필터|가이드라인|지침|기준|원칙|제한|제약|규칙|판단)|"
         r"안전\s*(?:필터|가이드라인|지침|정책)|(?:너의|네|당신의)\s*(?:안전\s*)?(?:필터|가이드라인|지침|정책|제한|제약|검열))"
         r"(?:을|를|은|는|들을|들은|에)?\s*(?:(?:모두|전부|다)\s*)?(?:무시|해제|끄|꺼|우회|비활성|없애|풀어|신경\s*쓰지)"),
    ],
    "injection.delimiter_smuggling": [
        (("<|", "inst]", "sys>>", "_of_turn>", "</"),
         r"<\|(?:im_start|im_end|system|user|assistant|start_header_id|end_header_id|eot_id|endoftext|begin_of_text)\|>"
         r"|\[/?inst\]|<</?sys>>|<(?:start|end)_of_turn>|</(?:user|human)>\s*<(?:system|assistant|developer)>"),
        (("system", "developer", "시스템", "instruction"),
         r"^[^\S\n]*(?:#{1,4}[^\S\n]*)?\[?(?:system|developer|시스템)(?:[^\S\n]+(?:prompt|message|instructions?)|[^\S\n]*(?:프롬프트|메시지))?"
         r"\]?[^\S\n]*:[^\S\n]*(?:you\b|your\b|ignore|disregard|forget|new\b|from\s+now|the\s+assistant|override|"
         r"너는|넌|당신은|이전|모든|지금부터|이제부터|새로운)"
         r"|^[^\S\n]*#{1,4}[^\S\n]*(?:system|system\s+prompt|new\s+instructions?|시스템|시스템\s*프롬프트)[^\S\n]*:?[^\S\n]*$"
         r"|\bnew\s+system\s+(?:prompt|instructions?|message)\s*:"),
    ],
}
_MARKERS = "injection.delimiter_smuggling"


class _Phrasing:
    def __init__(self, anchors: tuple[str, ...], pattern: str):
        self.anchors = frozenset(anchors)
        self.regex = re.compile(pattern, re.MULTILINE)

    def found_in(self, lowered: str, present: set[str]) -> bool:
        """Whether the text matches, given the anchors it holds."""
        return not self.anchors.isdisjoint(present) and self.regex.search(lowered) is not None


_RULES = [(name, [_Phrasing(*phrasing) for phrasing in phrasings]) for name, phrasings in INJECTION_RULES.items()]
_NO_MARKER_RULES = [(name, phrasings) for name, phrasings in _RULES if name != _MARKERS]
# Every anchor, looked for once per text: the ASCII ones one by one; the others (Korean) only in a
# text that holds one of them, which one regex search tells (its first characters are rare).
_ANCHORS = {anchor for _, phrasings in _RULES for phrasing in phrasings for anchor in phrasing.anchors}
_ASCII_ANCHORS = tuple(sorted(anchor for anchor in _ANCHORS if anchor.isascii()))
_OTHER_ANCHORS = tuple(sorted(anchor for anchor in _ANCHORS if not anchor.isascii()))
_ANY_OTHER_ANCHOR = re.compile("|".join(map(re.escape, _OTHER_ANCHORS)))


def _injections(lowered: str, markers: bool) -> Iterator[str]:
    present = {anchor for anchor in _ASCII_ANCHORS if anchor in lowered}
    if not lowered.isascii() and _ANY_OTHER_ANCHOR.search(lowered):
        present.update(anchor for anchor in _OTHER_ANCHORS if anchor in lowered)
    if not present:
        return
    for name, phrasings in _RULES if markers else _NO_MARKER_RULES:
        if any(phrasing.found_in(lowered, present) for phrasing in phrasings):
            yield name


def injection_rules(text: str, *, markers: bool = True) -> list[str]:
    """The injection rules `text` matches (markers: whether chat-template markers count)."""
    return list(_injections(folded(text), markers))


# --- a policy, compiled --------------------------------------------------------------------

class _Compiled:
    def __init__(self, policy: Policy):
        self.pii_actions = {kind: policy.pii_action(kind) for kind in pii.KINDS}
        self.acting_kinds = frozenset(kind for kind, action in self.pii_actions.items() if action != "allow")
        self.deny = _DenyList(policy.deny) if policy.deny and policy.deny_action != "off" else None
        self.deny_action = policy.deny_action
        self.injection = policy.injection


_BY_ID_SIZE = 1024
_by_id: dict[int, tuple[Policy, _Compiled]] = {}


@lru_cache(maxsize=256)
def _compile(encoded: bytes) -> _Compiled:
    return _Compiled(msgspec.json.decode(encoded, type=Policy))


def compiled(policy: Policy) -> _Compiled:
    """The matchers of `policy`, by object (the hot path) or else by content (an equal policy built anew)."""
    hit = _by_id.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    result = _compile(msgspec.json.encode(policy))
    if len(_by_id) >= _BY_ID_SIZE:
        _by_id.pop(next(iter(_by_id)), None)
    _by_id[id(policy)] = (policy, result)  # the policy is kept, so its id is not reused while here
    return result


# --- applying it -----------------------------------------------------------------------------

def _masked(text: str, matches: list[pii.Match]) -> str:
    """`text` with each match replaced by its placeholder, as pii.mask_text writes it ([KR_RRN])."""
    pieces, last = [], 0
    for match in matches:
        pieces += [text[last : match.start], f"[{match.kind.upper()}]"]
        last = match.end
    pieces.append(text[last:])
    return "".join(pieces)


def inspect(policy: Policy, endpoint: str, body: dict) -> Inspection:
    """Apply `policy` to a decoded request body of `endpoint` (one of ENDPOINTS); raise PolicyViolation
    for a rule whose action is "block"."""
    rules = compiled(policy)
    edits: list[tuple[Path, str]] = []
    masked: dict[str, int] = {}
    findings: list[Finding] = []
    for path, text, scope in _sites(endpoint, body):
        if rules.acting_kinds and (matches := _pii(rules, path, text)):
            edits.append((path, _masked(text, matches)))
            for match in matches:
                masked[match.kind] = masked.get(match.kind, 0) + 1
        injection = scope != NO_INJECTION and rules.injection != "off"
        if rules.deny is None and not injection:
            continue
        if text.isascii():
            plain, lowered = text, text.lower()
        else:
            plain = lowered = normalized(text)  # already folded
        if rules.deny is not None and (entry := rules.deny.first(plain, lowered)) is not None:
            param = param_of(path)
            if rules.deny_action == "block":
                raise PolicyViolation(f"'{param}' contains '{entry}', which is on the content deny list.",
                                      rule=CONTENT_DENY, param=param)
            findings.append(Finding(CONTENT_DENY, param, detail=entry))
        if injection:
            for rule in _injections(lowered, markers=scope == INJECTION):
                param = param_of(path)
                if rules.injection == "block":
                    raise PolicyViolation(f"'{param}' looks like a prompt-injection attempt ({rule}), which the policy"
                                          " of this key or team blocks.", rule=rule, param=param)
                findings.append(Finding(rule, param))
    return Inspection(body=_rewritten(body, edits) if edits else None, masked=masked, findings=findings)


def untouched(policy: Policy, endpoint: str, parsed) -> bool:
    """Whether `inspect` would leave this request as it is, told without decoding its body again: a
    chat request whose messages carry plain text only, under a policy of PII detectors alone, where
    no text holds anything a detector looks for (pii.ordinary). The common case on the hot path;
    False means only that the body must be inspected."""
    rules = compiled(policy)
    if endpoint != "chat/completions" or rules.deny is not None or rules.injection != "off":
        return False
    for message in parsed.messages:
        content = message.content
        if message.tool_calls is not None or content is not None and not (isinstance(content, str)
                                                                             and pii.ordinary(content)):
            return False
    return True


def _pii(rules: _Compiled, path: Path, text: str) -> list[pii.Match]:
    """The matches of the detectors the policy masks; PolicyViolation for one it blocks (the value is never told)."""
    matches = pii.find_pii(text, rules.acting_kinds)
    for match in matches:
        if rules.pii_actions[match.kind] == "block":
            param = param_of(path)
            raise PolicyViolation(f"'{param}' holds personal data of kind '{match.kind}', which the policy of this key"
                                  " or team blocks.", rule=f"pii.{match.kind}", param=param)
    return matches


def mask_answer(policy: Policy, text: str) -> str:
    """`text` (an answer, or a streamed piece of one) with the values of every detector the policy masks
    or blocks replaced by placeholders: an answer is never refused, so "block" masks it too."""
    kinds = compiled(policy).acting_kinds
    if not kinds:
        return text
    return pii.mask_text(text, kinds)[0]


def mask_arguments(policy: Policy, arguments: str) -> str:
    """A tool call's arguments (JSON text) with mask_answer applied to every string in them, and to
    every integer that reads as a value (a card number sent as a number becomes its placeholder),
    each with its key in view ("account": a context word); as plain text when they are not JSON.
    The same text when nothing was masked."""
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return mask_answer(policy, arguments)
    changed = False

    def masked(item, key: str | None):
        nonlocal changed
        if isinstance(item, dict):
            return {name: masked(inner, name) for name, inner in item.items()}
        if isinstance(item, list):
            return [masked(inner, key) for inner in item]
        if isinstance(item, str) or isinstance(item, int) and not isinstance(item, bool):
            text = item if isinstance(item, str) else str(item)
            if (out := _masked_value(policy, key, text)) != text:
                changed = True
                return out
        return item

    value = masked(value, None)
    return msgspec.json.encode(value).decode() if changed else arguments


def _masked_value(policy: Policy, key: str | None, text: str) -> str:
    """`text` masked with its key before it, as a context word would be in prose."""
    if key:
        labelled = mask_answer(policy, f"{key}: {text}")
        if labelled.startswith(f"{key}: "):
            return labelled[len(key) + 2 :]
    return mask_answer(policy, text)
