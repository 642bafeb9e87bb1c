"""The answer an answer line states: its leading expression, without the explanation after it.

math-verify, given a bare line without its "final answer is" anchor, grades the rightmost
number it finds: "7 (not 6)" and "5 or 6" passed for 6, "6 (because 2 + 2 = 4)" failed. So
the line is read here first, and math-verify only ever sees the stated answer:

    6 (because 2 + 2 = 4)       -> "6"            a remark in parentheses after the answer
    6, which is 2 times 3       -> "6"            a comma and then prose
    7, not 6 / 7 (not 6)        -> "7"            the stated answer is 7
    6 cm / 6 apples             -> "6"            a word right after a value is its unit
    $x = 6$ / \\boxed{6}         -> "x = 6" / "6"  math delimiters and boxes are unwrapped
    2, 3 / 2 and 3              -> "2, 3" / ...   several required values: a list, kept whole
    [1, 2) / \\{1, 2\\}           -> kept whole     brackets are never cut inside
    The length of BD is 6.      -> "6"            prose leading in to "is"/"are"/"equals"/"="
    5 or 6                      -> hedged         "or" between candidates offers alternatives

The rules, in order, on a scan that tracks bracket depth (nothing inside brackets is cut):
1. Markdown emphasis, math delimiters (`$`, `\\(`, `\\[`) and `\\text{..}`-like wrappers are
   dropped; `\\boxed{..}` contents replace the line (several boxes form a list, or hedge when
   "or" stands between them); a leading "So,", "Therefore," or "The (final) answer is" is
   dropped.
2. The answer ends, at depth 0, at a full stop followed by a space or the end, at a comma or
   semicolon followed by prose, at a parenthesis opened after a space once a value is
   complete, or at a prose word (one right after a value is taken as its unit and skipped
   when only a list separator or the end follows it).
3. "and" and commas between values make a list; "or" between values marks the line as
   hedged (several candidates for one answer), which is wrong unless the reference answer
   is itself a disjunction ("x = 2 or x = 3").
4. A line that starts with prose is read from after its first "is", "are", "equals", "=" or
   ":" when a mathematical answer follows; otherwise it is a text answer, cut the same way.

`kind` tells how the answer may be compared: "math" answers (a digit, a LaTeX command or an
operator) go to math-verify; "text" answers (words, option letters) only compare as strings.

Every step is one left-to-right pass over the line, linear in its length (untrusted text).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from r1vl.rewards.normalize import normalize_math


@dataclass(frozen=True)
class StatedAnswer:
    text: str  # the leading answer (LaTeX or plain), whitespace collapsed, never empty
    kind: str  # "math": may go to math-verify; "text": compared as a string only
    hedged: bool  # several candidate values joined by "or" ("5 or 6")


# Unicode symbols a model writes in plain text, as the LaTeX math-verify reads.
_UNICODE = str.maketrans({
    "\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u03c0": "\\pi ",
    "\u221e": "\\infty ", "\u00b0": "^\\circ ", "\u221a": "\\sqrt ", "\u2264": "\\le ",
    "\u2265": "\\ge ", "\u2248": "\\approx ", "\u2260": "\\ne ", "\u00b2": "^2", "\u00b3": "^3",
    "\u222a": "\\cup ", "\u2229": "\\cap ",
})
_EMPHASIS = re.compile(r"\*\*|__|`")
_DELIMITERS = re.compile(r"\\\$|\$|\\[()\[\]]")
# \text{ cm } and friends: their content is read as plain words (units, "or", "and").
_TEXT_WRAPPER = re.compile(r"\\(?:text(?:bf|it|rm|normal)?|mathrm|mbox|textsf)\s*+\{([^{}]*+)\}")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*+\{")
_LEAD_PHRASE = re.compile(
    r"(?:(?:so|thus|therefore|hence|finally)\b[,:]?\s*+)?"
    r"(?:(?:the\s++)?(?:final\s++|correct\s++)?(?:answer|option|choice)\b\s*+(?:is\b)?\s*+:?\s*+)?",
    re.IGNORECASE,
)
_TOKEN = re.compile(
    r"(?P<space>\s++)"
    r"|(?P<cmd>\\[A-Za-z]++|\\.)"
    r"|(?P<word>[A-Za-z]{2,}+)"
    r"|(?P<letter>[A-Za-z])"
    r"|(?P<uword>[^\W\d_]++)"  # words in other scripts: prose (units such as "6 个")
    r"|(?P<number>\d++)"
    r"|(?P<open>[(\[{])"
    r"|(?P<close>[)\]}])"
    r"|(?P<sep>[,;])"
    r"|(?P<stop>\.(?=\s|$)|\u2014)"
    r"|(?P<other>.)",
    re.DOTALL,
)
# Only this much of a line is read: the answer leads it, and real answers are short. A
# line whose answer runs past it states none (the scan is Python, ~3 s per MB).
_MAX_LINE = 2000
# Words that are mathematics, not prose.
_FUNCTIONS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt lim max "
    "min gcd lcm mod det".split())
_CONSTANTS = frozenset({"pi", "inf", "infinity", "infty"})
# After these (prose before them), the answer starts: "The length of BD is 6".
_LEAD_VERBS = frozenset({"is", "are", "equals", "was", "be"})
# LaTeX commands that complete a value (the others are operators or need an argument).
_VALUE_COMMANDS = frozenset({"\\pi", "\\infty", "\\circ", "\\%", "\\degree", "\\}", "\\|"})
_OR_REMARK = re.compile(r"\(\s{0,8}or\b", re.IGNORECASE)
_MATH_MARK = re.compile(r"[\d\\=+*/^<>]|(?<![A-Za-z])-")


def _unbox(text: str) -> str:
    """The contents of the \\boxed{..} groups when there are any (brace-matched), else text."""
    boxes: list[tuple[int, int, int]] = []  # (box start, content start, content end)
    pos = 0
    while (m := _BOX.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # unclosed: not a box
            break
        boxes.append((m.start(), m.end(), i - 1))
        pos = i
    if not boxes:
        return text
    parts = [text[boxes[0][1]:boxes[0][2]]]
    for (_, _, prev_end), (start, content_start, content_end) in zip(boxes, boxes[1:]):
        parts.append(" or " if re.search(r"\bor\b", text[prev_end + 1:start]) else ", ")
        parts.append(text[content_start:content_end])
    return "".join(parts)


def _prepare(line: str) -> str:
    text = _EMPHASIS.sub("", line.translate(_UNICODE))
    text = _unbox(text)
    text = _DELIMITERS.sub(" ", text)
    text = _TEXT_WRAPPER.sub(r" \1 ", text).strip()
    m = _LEAD_PHRASE.match(text)
    return text[m.end():] if m else text


def _classify(token: re.Match) -> str:
    """The role of a token at bracket depth 0: value, op, open, close, sep, stop, space,
    and, or, prose."""
    kind, text = token.lastgroup, token.group()
    if kind == "word":
        low = text.lower()
        if low in ("and", "or"):
            return low
        if low in _CONSTANTS or (text.isupper() and len(text) <= 3):  # pi; segment names AB
            return "value"
        return "op" if low in _FUNCTIONS else "prose"
    if kind == "uword":
        return "prose"
    if kind in ("letter", "number"):
        return "value"
    if kind == "cmd":
        return "value" if text in _VALUE_COMMANDS else "op"
    if kind == "other":
        return "value" if text in "%'!" else "op"  # 5%, f', 3!; the rest are operators
    return kind


def _scan(text: str, lead_in: bool) -> StatedAnswer | None:
    text, truncated = text[:_MAX_LINE], len(text) > _MAX_LINE
    kept: list[str] = []  # the tokens of the answer so far
    depth = 0
    complete = False  # the kept tokens end with a complete value
    hedged = False
    prose_start = None  # the line starts with prose: index in `text` where it did
    pending_sep: int | None = None  # index in `kept` of a separator not yet known to be a list
    unit_at: int | None = None  # index in `kept` after a skipped unit word
    space_before = False
    for token in _TOKEN.finditer(text):
        role = "inner" if depth else _classify(token)
        if role == "space":
            space_before = True
            continue
        if prose_start is not None:  # a prose line: look for the verb that leads in
            leads = (role == "prose" and token.group().lower() in _LEAD_VERBS
                     or role == "op" and token.group() in ("=", ":"))
            if leads and lead_in:
                lead_in = False  # only the first: a rescan per verb would be quadratic
                found = _scan(text[token.end():], lead_in=False)
                if found is not None and found.kind == "math":
                    return found
            if role in ("sep", "stop") or (role == "open" and space_before):
                break
            if role == "or":
                hedged = True
            space_before = False
            continue
        if unit_at is not None and role not in ("sep", "and", "or"):
            del kept[unit_at:]  # a word after a value, not followed by a list: the end
            break
        unit_at = None
        if pending_sep is not None:
            if role == "prose":
                del kept[pending_sep:]  # ", which is ...": the explanation starts at the comma
                break
            if role in ("and", "or"):  # "5, or 6": the word is the separator
                del kept[pending_sep:]
                complete = True
            pending_sep = None
        if role == "inner":
            depth += {"open": 1, "close": -1}.get(token.lastgroup, 0)
            complete = depth == 0
            kept.append((" " if space_before else "") + token.group())
            space_before = False
            continue
        if role == "prose":
            word = token.group().lower()
            if not kept:
                prose_start = token.start()
                space_before = False
                continue
            if lead_in and word in _LEAD_VERBS and not re.search(r"\d", "".join(kept)):
                return _scan(text[token.end():], lead_in=False)  # "x is 6", "AB is 6"
            if complete:  # a unit: skipped when a list separator or the end follows
                unit_at = len(kept)
                space_before = False
                continue
            break
        if role == "stop":
            break
        if role == "open" and complete and space_before:
            # "6 (because ...)": a remark after the answer; "5 (or 6)" offers another value.
            hedged |= _OR_REMARK.match(text, token.start()) is not None
            break
        if role == "sep":
            if not complete:
                break
            pending_sep = len(kept)
            complete = False
        elif role in ("and", "or"):
            if not complete:
                break
            hedged |= role == "or"
            complete = False
        elif role == "open":
            depth += 1
            complete = False
        elif role == "close":
            complete = True
        else:
            complete = role == "value"
        kept.append((" " if space_before and kept else "") + token.group())
        space_before = False
    else:
        if truncated:
            return None  # the answer runs past the part read: no answer this long is real
    if prose_start is not None:
        return _text_answer(text, hedged)
    if pending_sep is not None:
        del kept[pending_sep:]
    return _joined_answer(kept, hedged)


def _joined_answer(kept: list[str], hedged: bool) -> StatedAnswer | None:
    """The answer `_scan` kept, without a dangling "and"/"or" or separator."""
    while kept and kept[-1].strip().lower() in ("and", "or"):  # "6 and": nothing follows
        kept.pop()
    answer = re.sub(r"\s+", " ", "".join(kept)).strip().rstrip(" ,;:=+-*/^<>").lstrip(" ,;:")
    if not answer:
        return None
    kind = "math" if _MATH_MARK.search(answer) else "text"
    return StatedAnswer(answer, kind, hedged)


def _text_answer(text: str, hedged: bool) -> StatedAnswer | None:
    """A prose answer ("Yes", "the red car"), cut at the first comma, semicolon, full stop or
    parenthetical remark."""
    m = re.search(r"[,;]|\.(?:\s|$)|\s\(", text)
    answer = re.sub(r"\s+", " ", text[:m.start()] if m else text).strip()
    return StatedAnswer(answer, "text", hedged) if answer else None


def stated_answer(line: str) -> StatedAnswer | None:
    """The answer `line` states (see the module docstring); None when it states none."""
    return _scan(_prepare(line[:4 * _MAX_LINE]), lead_in=True)


# --------------------------------------------------------------------------- option letters

_OPTION = re.compile(r"\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*[.):]?")
_OPTION_WITH_TEXT = re.compile(r"(?:\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*[.):])\s")


def option_letter(line: str) -> str | None:
    """The option letter a line names, lowercased: "(A)", "A", "A.", "A)", "A:" and those
    followed by the option's text ("(B) 45 degrees"); None otherwise."""
    text = _EMPHASIS.sub("", line).replace("$", "").strip()
    m = _OPTION.fullmatch(text) or _OPTION_WITH_TEXT.match(text)
    if m is None:
        return None
    return (m.group(1) or m.group(2)).lower()


def normalize_answer(line: str) -> str:
    """The opt-in lenient form of an answer: its option letter when it names one, else
    `normalize_math` of it."""
    letter = option_letter(line)
    return letter if letter is not None else normalize_math(line)
