"""The answer inside a model's output, and the forms benchmarks compare: letters, yes/no, numbers.

Model outputs are untrusted text: nothing here evaluates them, and every regex is linear
(no nested quantifiers over the same characters).

`answer_text` looks, in order, for
1. the R1-VL final-answer section (`### The final answer is:` and its first line), the
   trainer's own rule (r1vl.rewards.rules.final_answer);
2. a JSON object's "short answer" / "answer" (DynaMath asks for one);
3. the last `\\boxed{...}`;
4. the last "answer is X" / "Answer: X" (the rest of that line);
5. the whole output (short outputs are the answer itself: "B", "Yes", "12").
"""
from __future__ import annotations

import ast
import json
import math
import re
import string

from r1vl.eval.trainer_api import final_answer, normalize_math

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")  # flat objects only: enough for {"short answer": ...}
_BOXED = re.compile(r"\\boxed\{")
_ANSWER_PHRASE = re.compile(r"(?:answer\s+is|answer\s*:)[ \t]*:?[ \t]*([^\n]+)", re.IGNORECASE)
_MAX_CHARS = 200_000  # longer outputs are cut before searching (the answer comes last)


def answer_text(prediction: str) -> tuple[str, str]:
    """(answer, rule) with rule one of final / json / boxed / phrase / whole (module docstring)."""
    text = prediction[-_MAX_CHARS:]
    found = final_answer(text)
    if found is not None:
        return clean(found), "final"
    for match in reversed(_JSON_OBJECT.findall(text)):
        try:
            obj = json.loads(match, strict=False)
        except ValueError:
            continue
        for key in ("short answer", "short_answer", "answer"):
            if isinstance(obj, dict) and isinstance(obj.get(key), (str, int, float)):
                return clean(str(obj[key])), "json"
    boxed = _last_boxed(text)
    if boxed is not None:
        return clean(boxed), "boxed"
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        return clean(phrases[-1]), "phrase"
    return clean(text), "whole"


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None without one."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def clean(answer: str) -> str:
    """Strip markdown emphasis, math dollars, backticks and trailing full stops from a short
    answer, repeatedly ("**12 cm**." -> "12 cm")."""
    previous = None
    while previous != answer:
        previous = answer
        answer = answer.strip()
        if answer.endswith("."):
            answer = answer[:-1]
        for mark in ("**", "*", "$", "`"):
            if len(answer) >= 2 * len(mark) and answer.startswith(mark) and answer.endswith(mark):
                answer = answer[len(mark):-len(mark)]
    return answer


# --------------------------------------------------------------------------- multiple choice

_LETTER_ONLY = re.compile(r"\(?([A-Z])\)?")
_LETTER_LEAD = re.compile(r"(?:option\s+)?\(?([A-Z])\)?\s*[.:)]\s+\S.*|(?:option\s+)\(?([A-Z])\)?", re.IGNORECASE)


def choice_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer names, by letter or by option text; None when it names none or several.

    options: letter -> option text ('' when only the letters are known, as in MathVerse).
    Rules, first that applies: the answer is a letter ("B", "(B)"); it starts with a letter
    and a separator ("B. 45", "(B) 45", "Option B"); it equals one option's text; exactly one
    of the letters stands alone among its words; exactly one option's text is contained in it.
    """
    text = answer.strip()
    m = _LETTER_ONLY.fullmatch(text)
    if m and m.group(1) in options:
        return m.group(1)
    m = _LETTER_LEAD.fullmatch(text)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        if letter in options:
            return letter
    norm = _norm_text(text)
    equal = [k for k, v in options.items() if v and _norm_text(v) == norm]
    if len(equal) == 1:
        return equal[0]
    words = set(re.sub(r"[.()\[\],:;!*#{}]", " ", text).split())
    named = [k for k in options if k in words]
    if len(named) == 1:
        return named[0]
    texts = [k for k, v in options.items() if v and _norm_text(v) and _norm_text(v) in norm]
    if len(texts) == 1:
        return texts[0]
    return None


def _norm_text(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def options_from_list(value: str, where: str) -> dict[str, str]:
    """A Python-literal list of option texts ("['3', '4']", as VLMEvalKit stores `choices`)
    as {A: '3', B: '4'}; '' or '[]' gives {}. Parsed with ast.literal_eval, never eval."""
    value = value.strip()
    if not value:
        return {}
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{where}: choices is not a list literal: {value[:80]!r}") from None
    if not isinstance(parsed, (list, tuple)) or len(parsed) > 26:
        raise ValueError(f"{where}: choices must be a list of at most 26 options, got {value[:80]!r}")
    return {string.ascii_uppercase[i]: str(c) for i, c in enumerate(parsed)}


# --------------------------------------------------------------------------- yes / no

def yes_no(answer: str) -> str | None:
    """"Yes" or "No" when the answer has exactly one of the two words (VLMEvalKit's rule)."""
    words = set(re.sub(r"[^\w\s]", " ", answer.lower()).split())
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return None


def gold_yes_no(value: str) -> str | None:
    return {"yes": "Yes", "no": "No", "1": "Yes", "0": "No", "true": "Yes", "false": "No"}.get(value.strip().lower())


# --------------------------------------------------------------------------- numbers

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:e-?\d+)?")
_FRACTION = re.compile(r"(-?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)")


def to_number(answer: str, *, percent: bool = False) -> float | None:
    """The number an answer states: "12", "-3.5", "1,234", "$12", "3/4", "\\frac{3}{4}",
    "2π", "12 cm", "x = 3" (after the last '='). None when there is no number or several
    unrelated ones ("3 or 4"). percent: "12%" reads as 0.12 (else as 12)."""
    text = normalize_math(answer).replace("\\%", "%").replace("\\pi", "π")
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    text = text.replace("$", "").replace("°", "").strip()
    frac = _FRACTION.fullmatch(text.strip("()"))
    if frac:
        den = float(frac.group(2))
        return float(frac.group(1)) / den if den else None
    pi = text.endswith("π")
    if pi:
        text = text[:-1].strip() or "1"
        text = "-1" if text == "-" else text
    numbers = _NUMBER.findall(text)
    if len(numbers) != 1:
        return None
    try:
        value = float(numbers[0])
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if pi:
        value *= math.pi
    if percent and text.rstrip().endswith("%"):
        value /= 100.0
    return value


def number_list(answer: str) -> list[float] | None:
    """"[1, 2.5]" / "1, 2.5" -> [1.0, 2.5]; None when an element is not a number."""
    body = answer.strip().strip("[]()")
    if not body:
        return None
    values = [to_number(part) for part in body.split(",")]
    return None if any(v is None for v in values) else values


def same_text(a: str, b: str) -> bool:
    """Equal after the lenient normalization (case, spacing, LaTeX forms, trailing stop)."""
    return normalize_math(a.strip().rstrip(".")) == normalize_math(b.strip().rstrip("."))
