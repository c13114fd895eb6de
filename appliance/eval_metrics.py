"""Rule-based metrics of an answer against its reference, and the parsing of a judge's score.

Text is NFKC-normalised and case-folded, then cut into tokens: Unicode words, with Korean
split into morphemes by kiwipiepy (Korean attaches particles to words: 서울은 and 서울이
share the morpheme 서울, which a split on spaces would miss). Every metric uses these
tokens: exact match and token F1 (SQuAD's), BLEU (sacrebleu, on the tokens as they are)
and ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, with this tokenizer). A sample
scores 0..1 on each; the run's BLEU is corpus BLEU, the others are means.

A reference may be one text or a list of them: a sample takes its best score against any.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

RULE_METRICS = ("exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_WORD = re.compile(r"\w+")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")


@functools.cache
def _kiwi():
    from kiwipiepy import Kiwi  # its model loads in about a second: only for Korean text

    return Kiwi()


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def tokens(text: str) -> list[str]:
    """Words, lower-cased, punctuation dropped; Korean words split into morphemes."""
    text = normalize(text)
    if not _HANGUL.search(text):
        return _WORD.findall(text)
    out: list[str] = []
    for morpheme in _kiwi().tokenize(text):
        if morpheme.tag.startswith("S"):  # symbols, foreign words, numbers: as words
            out += _WORD.findall(morpheme.form)
        else:
            out.append(unicodedata.normalize("NFKC", morpheme.form))
    return out


class _RougeTokenizer:
    """rouge-score's tokenizer interface: its own keeps only [a-z0-9], which drops Korean."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


@functools.cache
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(ROUGE_TYPES), tokenizer=_RougeTokenizer())


def _references(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else [str(r) for r in reference]


def _f1(predicted: list[str], reference: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(reference)).values())
    if not predicted or not reference:
        return float(predicted == reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def score(answer: str, reference: str | Sequence[str], metrics: Sequence[str] = RULE_METRICS) -> dict[str, float]:
    """One sample's scores (0..1) for the rule metrics asked for."""
    import sacrebleu

    refs = _references(reference)
    predicted, expected = tokens(answer), [tokens(r) for r in refs]
    out: dict[str, float] = {}
    if "exact_match" in metrics:
        out["exact_match"] = float(any(predicted == e for e in expected))
    if "token_f1" in metrics:
        out["token_f1"] = max(_f1(predicted, e) for e in expected)
    if "bleu" in metrics:
        out["bleu"] = min(1.0, sacrebleu.sentence_bleu(" ".join(predicted), [" ".join(e) for e in expected],
                                                       tokenize="none").score / 100)
    wanted = [m for m in ROUGE_TYPES if m in metrics]
    if wanted:
        best = {m: 0.0 for m in wanted}
        for r in refs:
            scores = _rouge().score(r, answer)
            best = {m: max(best[m], scores[m].fmeasure) for m in wanted}
        out.update(best)
    return out


def corpus_bleu(answers: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """BLEU over all samples (0..1), as BLEU is meant to be taken; each sample's own
    references, the missing ones of a sample with fewer padded as sacrebleu expects."""
    import sacrebleu

    refs = [[" ".join(tokens(r)) for r in _references(ref)] for ref in references]
    width = max((len(r) for r in refs), default=1)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    return min(1.0, sacrebleu.corpus_bleu([" ".join(tokens(a)) for a in answers], streams, tokenize="none").score / 100)


_JSON_SCORE = re.compile(r"\{[^{}]*\"score\"\s*:\s*(-?\d+(?:\.\d+)?)[^{}]*\}", re.S)
_LABELLED = re.compile(r"(?:score|rating|점수)\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?", re.I)
_FRACTION = re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+)")


def judge_score(text: str, scale: int) -> float | None:
    """The score (1..scale) in a judge's answer, or None when there is none to be sure of:
    `{"score": n}` first, then `Score: n` (or 점수: n), then `n/scale`; a number outside
    1..scale counts as none."""
    found: str | None = None
    if match := _JSON_SCORE.search(text):
        try:
            found = str(json.loads(match.group(0))["score"])
        except (ValueError, KeyError, TypeError):
            found = match.group(1)
    elif (match := _LABELLED.search(text)) and (match.group(2) in (None, str(scale))):
        found = match.group(1)
    elif (match := _FRACTION.search(text)) and match.group(2) == str(scale):
        found = match.group(1)
    if found is None:
        return None
    value = float(found)
    return value if 1 <= value <= scale else None
