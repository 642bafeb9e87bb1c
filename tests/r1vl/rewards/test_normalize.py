"""The opt-in lenient matcher: `normalize_math` and the option letters of `normalize_answer`."""
import random
import re
import time

import pytest
from reward_cases import Ex, answer_accuracy, completion

from r1vl.rewards import RewardConfig, normalize_answer, normalize_math, option_letter
from r1vl.rewards import normalize as n


@pytest.mark.parametrize("a, b", [
    ("x = 3", "x=3"), ("\\frac{1}{2}", "\\frac 1 2"), ("\\dfrac{1}{2}", "1/2"),
    ("\\frac12", "1/2"), ("6.0", "6"), ("2.50", "2.5"), ("12,345", "12345"),
    ("12\\,345", "12345"), ("\u22125", "-5"), ("$6$", "6"), ("\\left( 1 \\right)", "(1)"),
    ("a\\,b", "a b"), ("  A   b ", "a b"), ("1,234.5", "1234.5"),
    ("\\frac{x+1}{2}", "\\frac {x + 1} {2}"), ("a\tb", "a b"), ("x\t=\n3", "x=3"),
])
def test_normalize_equal(a, b):
    assert normalize_math(a) == normalize_math(b)


@pytest.mark.parametrize("a, b", [
    ("(1,234)", "(1234)"), ("3\u20135", "3-5"), ("6.01", "6"), ("1 2", "12"), ("60", "6"),
    ("1,2345", "12345"), ("\\frac{x+1}{2}", "x+1/2"),
])
def test_normalize_keeps_meaning(a, b):
    assert normalize_math(a) != normalize_math(b)


def test_normalize_is_idempotent():
    for s in ["\\frac 1 2 = 0.50", "x = 12,000.0 cm", "$\\left(\u22123\\right)$", "a  \\, b"]:
        assert normalize_math(normalize_math(s)) == normalize_math(s)


def test_normalize_cost_per_megabyte():
    # The docstring's figure: at most ~0.25 s of CPU per MB of LaTeX-heavy prose. The bound
    # here is 4x that, for a slow or busy machine; a quadratic pattern would take minutes.
    text = "BD = 12/2 = 6, so x = 6.0 and the area is \\frac{1}{2} bh. " * ((1 << 20) // 60)
    start = time.process_time()
    normalize_math(text)
    assert time.process_time() - start < 1.0


# --------------------------------------------------------------------------- option letters

@pytest.mark.parametrize("line", ["(A)", "A", "A.", "A)", "A:", "**(A)**", "$A$", "( a )",
                                  "(A) 12 cm", "A. 45 degrees"])
def test_option_letter_forms(line):
    assert option_letter(line) == "a"
    assert normalize_answer(line) == normalize_answer("A")


@pytest.mark.parametrize("line", ["AB", "A or B", "x = 6", "A triangle", "(AB)", "6", ""])
def test_not_an_option_letter(line):
    assert option_letter(line) is None


@pytest.mark.parametrize("symbolic", [False, True])
@pytest.mark.parametrize("line", ["(A)", "A)", "(A) 12 cm"])
def test_letters_match_only_when_normalized(line, symbolic, verifier):
    # The paper's rule (the default) compares the line; only normalize=True folds letters.
    def acc(normalize):
        return answer_accuracy(completion(answer=line), Ex(completion(answer="A")),
                               RewardConfig(normalize=normalize, symbolic=symbolic), verifier)
    assert (acc(False), acc(True)) == (0.0, 1.0)
    assert answer_accuracy(completion(answer="(B)"), Ex(completion(answer="A")),
                           RewardConfig(normalize=True, symbolic=symbolic), verifier) == 0.0


def test_exact_match_and_normalized_match():
    def acc(answer, gold="6", **cfg):
        return answer_accuracy(completion(answer=answer), Ex(completion(answer=gold)),
                               RewardConfig(symbolic=False, **cfg))
    assert acc("6") == 1.0
    assert acc("6.0") == 0.0 and acc("6.0", normalize=True) == 1.0
    assert acc("\u22123", gold="-3") == 0.0 and acc("\u22123", gold="-3", normalize=True) == 1.0
    assert acc("12,000", gold="12000", normalize=True) == 1.0
    assert acc("$\\frac 1 2$", gold="\\frac{1}{2}", normalize=True) == 1.0
    assert acc("Left", gold="left") == 0.0 and acc("Left", gold="left", normalize=True) == 1.0
    assert acc("7", gold="6", normalize=True) == 0.0


def test_fast_patterns_equal_their_plain_lookbehind_forms():
    # The patterns start with a character class for speed; their plain forms, with the
    # lookbehind first, are the reference: same matches on random strings.
    rng = random.Random(0)
    pairs = [
        (n._DECIMAL, re.compile(r"(?<![\d.])\d++\.\d++")),
        (n._THOUSANDS, re.compile(r"(?<![\d,.(\[{])\d{1,3}+(?:,\d{3})++(?![\d)\]}]|,\d)")),
        (n._SPACE_AT_SYMBOL, re.compile(r"\s++(?=[^\w\s])|(?<=[^\w\s])\s++")),
    ]
    latex_thousands = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
    for _ in range(3000):
        s = "".join(rng.choice("0123456789,. ()[]{}\\x=\t") for _ in range(rng.randrange(1, 30)))
        for fast, plain in pairs:
            assert fast.sub("#", s) == plain.sub("#", s), (fast.pattern, s)
        assert n._LATEX_THOUSANDS.sub(r"\1", s) == latex_thousands.sub("", s), s
