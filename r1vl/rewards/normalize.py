"""An opt-in, lenient canonical form for answers and key steps (off by default).

The paper compares answers by their exact final line and key steps by lowercase
substring. With `RewardConfig(normalize=True)` both sides first go through
`normalize_math`, which folds away differences that never change the meaning:

- case; whitespace runs; whitespace next to a symbol ("x = 3" -> "x=3");
- math delimiters `$`, `\\(`, `\\)`, `\\[`, `\\]`, and `\\left` / `\\right`;
- LaTeX spacing `\\,` `\\;` `\\:` `\\!` `\\ ` `~` `\\quad` `\\qquad`;
- fraction forms: `\\dfrac`, `\\tfrac`, `\\frac 1 2`, `\\frac12`, `\\frac{12}{2}` -> `12/2`;
- numbers: "6.0" -> "6", "2.50" -> "2.5", thousands separators "12,345" and
  "12\\,345" -> "12345";
- unicode minus signs -> "-".

Answers additionally fold option letters ("(A)", "A.", "A)" -> "a"; see
`r1vl.rewards.answer.normalize_answer`).

Every pattern is linear on adversarial input (possessive quantifiers and lookbehinds
keep a failed match from rescanning a long run). Cost, measured on a busy 2-core machine
(`benchmarks/bench_rewards.py`): 5-90 ms of CPU per MB of text on single-character runs
and about 150 ms per MB of LaTeX-heavy prose, i.e. well under a millisecond for a
completion of a few KB.
"""
from __future__ import annotations

import re

# U+2212 minus, U+2012 figure dash, U+FE63 small hyphen-minus, U+FF0D fullwidth hyphen-minus.
# Not the en dash: "3–5" is a range, not a subtraction.
_MINUS = str.maketrans({"\u2212": "-", "\u2012": "-", "\ufe63": "-", "\uff0d": "-"})
_DELIMITERS = re.compile(r"\$|\\[()\[\]]|\\left(?![a-z])|\\right(?![a-z])")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|~|\\q?quad(?![a-z])")
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![a-z])")
# \frac followed by two arguments, each a brace group without nesting or one character:
# "\frac{1}{2}", "\frac 1 2", "\frac12". Nested braces are left alone (no recursion).
_FRAC = re.compile(r"\\frac\s*+(\{[^{}]*+\}|[^\s{}\\])\s*+(\{[^{}]*+\}|[^\s{}\\])")
# Patterns start with a character class rather than a lookbehind, so that the regex engine
# skips ahead to candidate characters instead of testing the lookbehind at every position
# (twice as fast on prose); the lookbehind then looks at the character before the match.
# A number with a decimal point, starting at the beginning of its digit run.
_DECIMAL = re.compile(r"\d(?<![\d.]\d)\d*+\.\d++")
# A thousands-grouped integer "12,345,678"; not part of a longer number or of a tuple
# such as "(1,234)" (the comma then separates coordinates).
_THOUSANDS = re.compile(r"\d(?<![\d,.(\[{]\d)\d{0,2}+(?:,\d{3})++(?![\d)\]}]|,\d)")
# LaTeX's thin space as a thousands separator: "12\,345".
_LATEX_THOUSANDS = re.compile(r"(\d)\\,(?=\d{3}(?!\d))")
# Whitespace right before or after a symbol (anything but a letter, digit or underscore),
# in one pass; the remaining runs of whitespace become single spaces.
_SPACE_AT_SYMBOL = re.compile(r"\s(?:\s*+(?=[^\w\s])|(?<=[^\w\s]\s)\s*+)")
_SPACES = re.compile(r"\s{2,}+|[^\S ]")
_WORD = re.compile(r"\w+")


def _unbrace(arg: str) -> str:
    return arg[1:-1].strip() if arg.startswith("{") else arg


def _frac(m: re.Match) -> str:
    num, den = _unbrace(m.group(1)), _unbrace(m.group(2))
    # Simple operands become "a/b" so that "\frac{12}{2}" and "12/2" agree; compound ones
    # keep the braces, since "a+1/b" would change the meaning.
    if _WORD.fullmatch(num) and _WORD.fullmatch(den):
        return f"{num}/{den}"
    return f"\\frac{{{num}}}{{{den}}}"


def _trim_decimal(m: re.Match) -> str:
    text = m.group(0).rstrip("0")
    return text[:-1] if text.endswith(".") else text


def normalize_math(text: str) -> str:
    """Canonical form of `text` for the opt-in lenient matcher (see the module docstring).

    Idempotent: normalize_math(normalize_math(s)) == normalize_math(s).
    """
    text = text.translate(_MINUS).casefold()
    # Each pass runs only when the text holds the character it needs: a pass costs 5-30 ms
    # per MB even when it changes nothing.
    if "$" in text or "\\" in text:
        text = _DELIMITERS.sub("", text)
    if "\\" in text or "~" in text:
        text = _LATEX_THOUSANDS.sub(r"\1", text)
        text = _LATEX_SPACE.sub(" ", text)
    if "frac" in text:
        text = _FRAC_VARIANT.sub(r"\\frac", text)
        text = _FRAC.sub(_frac, text)
    if "," in text:
        text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    if "." in text:
        text = _DECIMAL.sub(_trim_decimal, text)
    text = _SPACE_AT_SYMBOL.sub("", text)
    return _SPACES.sub(" ", text).strip()
