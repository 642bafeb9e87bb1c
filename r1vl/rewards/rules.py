"""The paper's rules on the text of one completion: structure, step bodies, final answer.

Everything here is a pure function of strings, deterministic, and linear in the length of
the text: completions are untrusted model output, so every regex below is written so that
a failed match cannot backtrack over a long run (checked by the 1 MB tests).

The output format the model is trained to write (docs/method.md)::

    ### Image Description:
    ...
    ### Rationales:
    ...
    ### Let's think step by step.
    ### Step 1:
    ...
    ### Step N:
    ...
    ### The final answer is:
    <answer>
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from r1vl.rewards.normalize import normalize_math

DESCRIPTION = "### Image Description:"
RATIONALES = "### Rationales:"
FIRST_STEP = "### Step 1:"
FINAL_ANSWER = "### The final answer is:"

# The authors' step-body regex, verbatim: a body runs from its header to the next "###"
# that starts a line, or to the end. Linear: every match that starts succeeds (the lazy
# body can always stretch to \Z) and matches do not overlap.
_STEP_BODY = re.compile(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", re.DOTALL)
# Step headers anywhere in the text, as the authors' logic check finds them.
_STEP_HEADER = re.compile(r"### Step (\d+):")
# A step number with more significant digits than this (leading zeros aside: "Step 0002" is
# step 2, as int() reads it) cannot be 1..N for any real completion; checking the length
# before int() keeps int() away from a megabyte of digits.
_MAX_STEP_DIGITS = 6


# --------------------------------------------------------------------------- StepRAR: key steps

def step_bodies(completion: str) -> list[str]:
    """The body of each `### Step N:` section, in order (the authors' regex)."""
    return _STEP_BODY.findall(completion)


def step_text(completion: str) -> str:
    """The bodies of all `### Step N:` sections joined by single spaces, lowercased.

    This is the text StepRAR searches for key steps (the paper's soft matching).
    """
    return " ".join(step_bodies(completion)).lower()


def key_step_match(
    completion: str, key_steps: Sequence[str | Sequence[str]], *, normalize: bool = False
) -> float:
    """k = (matched key-step entries) / (number of entries), in [0, 1]; 0 without key steps.

    Args:
        completion: the model's output.
        key_steps: the `Steps` list of a record: each entry is a string or a sequence of
            equivalent alternatives; an entry matches when any alternative, lowercased, is a
            substring of `step_text(completion)`.
        normalize: also pass both sides through `normalize_math` (opt-in; the paper's rule
            is plain lowercase substring matching).
    """
    return match_fraction(step_text(completion), key_steps, normalize=normalize)


def match_fraction(
    text: str, key_steps: Sequence[str | Sequence[str]], *, normalize: bool = False
) -> float:
    """`key_step_match` on an already extracted, lowercased step text.

    `key_steps` may also be the record's dict form {"Steps": [...]}; iterating the dict
    itself would silently match its key "Steps" instead.
    """
    if isinstance(key_steps, Mapping):
        key_steps = key_steps.get("Steps", ())
    if not key_steps:
        return 0.0
    if normalize:
        text = normalize_math(text)
    matched = 0
    for entry in key_steps:
        alternatives = (entry,) if isinstance(entry, str) else entry
        for alt in alternatives:
            needle = normalize_math(alt) if normalize else alt.lower()
            # An empty alternative would match every text; it carries no information.
            if needle and needle in text:
                matched += 1
                break
    return matched / len(key_steps)


# --------------------------------------------------------------------------- StepRVR: validity

def is_complete(completion: str) -> bool:
    """Completeness: the four required headers are all present."""
    return all(h in completion for h in (DESCRIPTION, RATIONALES, FIRST_STEP, FINAL_ANSWER))


def is_logical(completion: str) -> bool:
    """Logic: description < rationales < steps < final answer, steps numbered exactly 1..N.

    Header positions are where the headers occur anywhere in the text (the authors' regexes
    are not anchored to line starts). Description, rationales and final-answer headers must
    each occur exactly once: with two final answers "the order of the sections" is not
    defined and the completion is hedging, so it is not a valid chain (the authors' code
    only looked at the first final-answer header; this is stricter on purpose). The
    "### Let's think step by step." line is not required: neither the paper nor the
    authors' code checks it.
    """
    for header in (DESCRIPTION, RATIONALES, FINAL_ANSWER):
        if completion.count(header) != 1:
            return False
    headers = list(_STEP_HEADER.finditer(completion))
    if not headers:
        return False
    for expected, m in enumerate(headers, start=1):
        digits = m.group(1).lstrip("0")
        if len(digits) > _MAX_STEP_DIGITS or int(digits or "0") != expected:
            return False
    return (
        completion.index(DESCRIPTION)
        < completion.index(RATIONALES)
        < headers[0].start()
        and headers[-1].end() <= completion.index(FINAL_ANSWER)
    )


def step_rvr(completion: str) -> float:
    """StepRVR: 1.0 if the completion is complete and logical (docs/method.md), else 0.0."""
    return 1.0 if is_complete(completion) and is_logical(completion) else 0.0


# --------------------------------------------------------------------------- final answer

def final_answer(text: str) -> str | None:
    """The first non-empty line after the first `### The final answer is:`, stripped.

    Returns None when the header is missing or nothing but whitespace follows it (an empty
    answer line is no answer). This is the authors' `### The final answer is:\\s*\\n?(.*)`
    with `re.search`, written with str.find so a megabyte of whitespace stays linear.
    """
    start = text.find(FINAL_ANSWER)
    if start < 0:
        return None
    rest = text[start + len(FINAL_ANSWER):].lstrip()
    line = rest.split("\n", 1)[0].strip()
    return line or None


def reference_answer(solution: str) -> str:
    """The ground-truth answer of a reference solution.

    Its final-answer line; a solution without the header is itself the answer (the
    authors' fallback, e.g. for records whose `solution` is just "6").
    """
    answer = final_answer(solution)
    return answer if answer is not None else solution.strip()
