"""Rule metrics on English and Korean text, and reading a judge's score."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from appliance.eval_metrics import RULE_METRICS, corpus_bleu, judge_score, score, tokens


def test_tokens_are_words_and_korean_is_cut_into_morphemes():
    assert tokens("  The Capital of FRANCE is Paris!  ") == ["the", "capital", "of", "france", "is", "paris"]
    assert tokens("ＡＢＣ１２３") == ["abc123"]  # NFKC: full-width letters are the ASCII ones
    seoul = tokens("서울은 대한민국의 수도입니다.")
    assert seoul[:4] == ["서울", "은", "대한민국", "의"] and "." not in seoul
    # Particles differ, the morpheme 서울 is shared: a split on spaces would share nothing.
    assert "서울" in tokens("서울이에요") and "서울" in tokens("서울은요")


def test_identical_answers_score_one_and_unrelated_ones_zero():
    assert score("Paris.", "paris") == {metric: 1.0 for metric in RULE_METRICS} | {"rouge2": 0.0}  # one word: no bigram
    long = "the quick brown fox jumps over the lazy dog"
    assert set(score(long, long).values()) == {1.0}
    assert set(score("blue sky", "green grass").values()) == {0.0}


def test_partial_answers_score_between_and_korean_partial_matches_count():
    scores = score("The capital of France is Paris.", "Paris")
    assert scores["exact_match"] == 0 and scores["token_f1"] == pytest.approx(2 * (1 / 6) * 1 / (1 / 6 + 1))
    assert 0 < scores["rougeL"] < 1 and 0 <= scores["bleu"] < 1
    korean = score("서울이에요", "서울입니다")
    assert korean["exact_match"] == 0 and 0 < korean["token_f1"] < 1 and 0 < korean["rouge1"] < 1


def test_several_references_take_the_best():
    assert score("a banana", ["an apple", "a banana"])["exact_match"] == 1.0
    assert score("a banana", ["an apple", "a banana"], ["token_f1"]) == {"token_f1": 1.0}


def test_corpus_bleu_is_one_for_perfect_answers_and_takes_several_references():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert corpus_bleu(["the cat sat on the mat", "서울입니다"],
                       ["the cat sat on the mat", ["서울이에요", "서울입니다"]]) == pytest.approx(1.0)
    assert corpus_bleu(["a b c d"], ["w x y z"]) == 0.0


@pytest.mark.parametrize("said, scale, expected", [
    ('{"score": 4, "reason": "close"}', 5, 4.0),
    ('Sure! {\n  "reason": "exact",\n  "score": 5\n}', 5, 5.0),
    ("Score: 3/5", 5, 3.0),
    ("Rating: **2**", 5, 2.0),
    ("점수: 5", 5, 5.0),
    ("I would give it 7/10.", 10, 7.0),
    ("I would give it 7/10.", 5, None),  # another scale: not this judge's score
    ("Score: 9", 5, None),  # out of range
    ('{"score": 0}', 5, None),
    ("A fine answer.", 5, None),
    ("", 5, None),
])
def test_a_judge_score_is_read_only_when_it_is_clear(said, scale, expected):
    assert judge_score(said, scale) == expected


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (.ci/run installs it)")
def test_the_metrics_and_the_korean_tokenizer_need_no_network():
    """Scored in a process with a network namespace of its own, where nothing can be reached."""
    script = ("from appliance.eval_metrics import corpus_bleu, score\n"
              "print(score('서울이에요', '서울입니다')['token_f1'] > 0, corpus_bleu(['a b c d'], ['a b c d']))")
    offline = subprocess.run(["bwrap", "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-net", "--",
                              sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.split() == ["True", "1.0"]
