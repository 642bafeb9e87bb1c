"""Each benchmark's own rule for one answer, and its own metric over a file.

A matcher takes an item (r1vl.eval.tsv.Item) and the answer text found in the model's
output (r1vl.eval.extract.answer_text) and returns an Outcome: whether the answer could be
read at all (`parsed`: a letter, yes/no or number was found; an LLM judge is asked only
about unparsed ones), whether it is right, and what was read. An aggregator turns the
outcomes of a file into the benchmark's metrics, scaled as the paper reports them
(percent; MME in points out of 2800), with "score" the paper's column.

The rules follow VLMEvalKit's evaluation of each benchmark (read, not copied); where they
differ it is said at the function.
"""
from __future__ import annotations

import math
import string
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r1vl.eval import extract
from r1vl.eval.tsv import Item


@dataclass(frozen=True)
class Outcome:
    parsed: bool  # the answer could be read as this benchmark's kind of answer
    correct: bool
    extracted: str | None  # what was read: a letter, Yes/No, a number, the text


Matcher = Callable[[Item, str], Outcome]
_WRONG = Outcome(False, False, None)


# --------------------------------------------------------------------------- shared rules

def _mcq(answer: str, options: dict[str, str], gold: str) -> Outcome:
    letter = extract.choice_letter(answer, options)
    if letter is None:
        return _WRONG
    return Outcome(True, letter == gold, letter)


def _gold_letter(gold: str, options: dict[str, str]) -> str:
    """The gold letter: the answer itself, or the letter of the option whose text it is."""
    gold = gold.strip()
    if len(gold) == 1 and gold.upper() in options:
        return gold.upper()
    for letter, text in options.items():
        if extract.same_text(text, gold):
            return letter
    return gold


def _free_form(answer: str, gold: str, tolerance: float = 1e-6) -> Outcome:
    """Same text after normalization, or the same number within `tolerance` (VLMEvalKit's
    MathVision is_equal; its latex2sympy step is covered by normalize_math's LaTeX forms)."""
    if not answer:
        return _WRONG
    if extract.same_text(answer, gold):
        return Outcome(True, True, answer)
    a, g = extract.to_number(answer), extract.to_number(gold)
    if a is not None and g is not None:
        return Outcome(True, abs(a - g) <= tolerance, str(a))
    return Outcome(True, False, answer)


def _gold_number(gold: str) -> float:
    value = extract.to_number(gold)
    if value is None:
        raise ValueError(f"the gold answer {gold[:80]!r} is not a number")
    return value


def options_from_columns(item: Item) -> dict[str, str]:
    """{letter: text} from the columns A, B, ... that are present and non-empty (MMStar)."""
    return {c: item.fields[c].strip() for c in string.ascii_uppercase
            if item.fields.get(c, "").strip()}


# --------------------------------------------------------------------------- matchers

def match_mcq(item: Item, answer: str) -> Outcome:
    """MMStar: options in columns A-D, `answer` their letter."""
    options = options_from_columns(item)
    return _mcq(answer, options, _gold_letter(item.fields["answer"], options))


def match_mathvista(item: Item, answer: str) -> Outcome:
    """MathVista: `question_type` multi_choice (choices list; gold `answer_option` or the
    choice equal to `answer`) or free_form by `answer_type`: integer (equal integers),
    float (equal after rounding both to `precision` decimals, MathVista's own rule, or to the
    gold answer's decimals without that column; VLMEvalKit compares the judge's already
    rounded string), list (element-wise), text (normalized)."""
    f = item.fields
    gold = f["answer"].strip()
    if f["question_type"].strip() == "multi_choice":
        options = extract.options_from_list(f.get("choices", ""), item.where())
        option = f.get("answer_option", "").strip()
        return _mcq(answer, options, option.upper() if option else _gold_letter(gold, options))
    kind = f["answer_type"].strip()
    if kind == "integer":
        value = extract.to_number(answer)
        if value is None:
            return _WRONG
        return Outcome(True, value == round(value) and round(value) == round(_gold_number(gold)), str(value))
    if kind == "float":
        value = extract.to_number(answer)
        if value is None:
            return _WRONG
        # The row's `precision` (decimals); without one, as many decimals as the gold answer has.
        precision = f.get("precision", "").strip()
        digits = int(float(precision)) if precision and precision.lower() != "nan" else (
            len(gold.rsplit(".", 1)[1]) if "." in gold else 0)
        return Outcome(True, round(value, digits) == round(_gold_number(gold), digits), str(round(value, digits)))
    if kind == "list":
        values, golds = extract.number_list(answer), extract.number_list(gold)
        if values is None:
            return _WRONG
        return Outcome(True, golds is not None and len(values) == len(golds)
                       and all(abs(a - b) <= 1e-6 for a, b in zip(values, golds)), str(values))
    if not answer:
        return _WRONG
    return Outcome(True, extract.same_text(answer, gold), answer)


def match_mathvision(item: Item, answer: str) -> Outcome:
    """MathVision: a non-empty `choices` list makes it multiple choice (gold: a letter);
    otherwise free form (text or number)."""
    options = extract.options_from_list(item.fields.get("choices", ""), item.where())
    gold = item.fields["answer"]
    if options:
        return _mcq(answer, options, _gold_letter(gold, options))
    return _free_form(answer, gold)


_LETTERS_ONLY = {c: "" for c in "ABCDEF"}


def match_mathverse(item: Item, answer: str) -> Outcome:
    """MathVerse: multiple choice (`question_type` multi-choice; the options are inside the
    question, so only letters are matched) or free form. VLMEvalKit asks its judge whether
    the extracted answer and the gold one agree; the rule-based score needs the same text
    or the same number."""
    gold = item.fields["answer"].strip()
    kind = item.fields.get("question_type", "").strip().lower()
    if kind.startswith("multi") or (not kind and len(gold) == 1 and gold.upper() in _LETTERS_ONLY):
        return _mcq(answer, _LETTERS_ONLY, gold.upper())
    return _free_form(answer, gold)


def match_dynamath(item: Item, answer: str) -> Outcome:
    """DynaMath by `answer_type`: multiple choice (a letter), float (within 0.001, DynaMath's
    rule), free form (DynaMath's rule: the answer, lowercased, is contained in the gold one)."""
    kind = item.fields["answer_type"].strip().lower()
    gold = item.fields["answer"].strip()
    if kind == "multiple choice":
        return _mcq(answer, {c: "" for c in "ABCDE"}, gold.upper())
    if kind == "float":
        value = extract.to_number(answer)
        if value is None:
            return _WRONG
        return Outcome(True, abs(value - _gold_number(gold)) <= 1e-3, str(value))
    if not answer:
        return _WRONG
    return Outcome(True, answer.lower() in gold.lower(), answer)


def match_chartqa(item: Item, answer: str) -> Outcome:
    """ChartQA's relaxed accuracy: a number within 5% of a numeric, non-zero gold answer,
    otherwise the same string ignoring case. `answer` may be a list literal of accepted
    answers. One leniency: a trailing % is dropped on both sides (VLMEvalKit divides only the
    side that has it by 100, so "12%" against a gold "12" fails there)."""
    if not answer:
        return _WRONG
    raw = item.fields["answer"].strip()
    golds = list(extract.options_from_list(raw, item.where()).values()) if raw.startswith("[") else [raw]
    pred = _plain_number(answer)

    def ok(gold: str) -> bool:
        target = _plain_number(gold)
        if pred is not None and target:
            return abs(pred - target) / abs(target) <= 0.05
        return answer.strip().lower() == gold.strip().lower()

    return Outcome(True, any(ok(g) for g in golds), answer)


def _plain_number(text: str) -> float | None:
    """ChartQA reads a string as a number only when it is one ("12", "1.5", "12%")."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def match_yes_no(item: Item, answer: str) -> Outcome:
    """HallusionBench and MME: Yes or No (exactly one of the two words in the answer)."""
    said = extract.yes_no(answer)
    if said is None:
        return _WRONG
    return Outcome(True, said == extract.gold_yes_no(item.fields["answer"]), said)


def match_reference(item: Item, answer: str) -> Outcome:
    """The trainer's answer accuracy (r1vl.rewards: exact final line, then math-verify) against
    the record's solution; used for the trainer's own data files (r1vl.eval.records)."""
    if not answer:
        return _WRONG
    from r1vl.eval.trainer_api import FINAL_ANSWER, Example, answer_accuracy

    gold = Example(image_path=Path(item.image_path), problem="", solution=item.fields["solution"])
    return Outcome(True, answer_accuracy(f"{FINAL_ANSWER}\n{answer}", gold) == 1.0, answer)


# --------------------------------------------------------------------------- aggregators

Scored = list[tuple[Item, Outcome]]


def _pct(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def _by(scored: Scored, column: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, o in scored:
        if column in item.fields:
            groups[item.fields[column]].append(o.correct)
    return {f"{column}={k}": _pct(v) for k, v in sorted(groups.items())}


def accuracy(columns: tuple[str, ...] = ()) -> Callable[[Scored], dict]:
    """Plain accuracy in percent ("score"), with a breakdown by each of `columns` if present."""

    def aggregate(scored: Scored) -> dict:
        out = {"score": _pct(o.correct for _, o in scored)}
        for column in columns:
            out.update(_by(scored, column))
        return out

    return aggregate


def aggregate_dynamath(scored: Scored) -> dict:
    """Average accuracy over every variant (the paper's column) and worst-case accuracy: a
    question (`qid`) counts only when all its variants are right."""
    per_question: dict[str, list[bool]] = defaultdict(list)
    for item, o in scored:
        per_question[item.fields.get("qid", item.index)].append(o.correct)
    return {"score": _pct(o.correct for _, o in scored),
            "worst_case": _pct(all(v) for v in per_question.values()),
            **_by(scored, "subject"), **_by(scored, "knowledge_level")}


def hallusion_ids(item: Item) -> tuple[str, str, str]:
    """(set_id, figure_id, question_id): the columns when present, else VLMEvalKit's index
    "<cat>_<sub>_<?>_<set>_<figure>_<question>" fields 3, 4, 5."""
    f = item.fields
    if all(f.get(c, "").strip() for c in ("set_id", "figure_id", "question_id")):
        return f["set_id"].strip(), f["figure_id"].strip(), f["question_id"].strip()
    parts = item.index.split("_")
    if len(parts) < 6:
        raise ValueError(f"{item.where()}: no set_id/figure_id/question_id columns and the index "
                         "is not <a>_<b>_<c>_<set>_<figure>_<question>")
    return parts[3], parts[4], parts[5]


def aggregate_hallusion(scored: Scored) -> dict:
    """aAcc (every question), fAcc (a figure counts when all its questions are right) and
    qAcc (a question counts when it is right for every figure it is asked about), grouped
    within `l2-category` and `set_id` as VLMEvalKit does. "score" is their mean: the
    OpenCompass leaderboard's HallusionBench number, which the paper's column reproduces
    (see the README's Evaluate section)."""
    figures: dict[tuple, list[bool]] = defaultdict(list)
    questions: dict[tuple, list[bool]] = defaultdict(list)
    for item, o in scored:
        set_id, figure_id, question_id = hallusion_ids(item)
        l2 = item.fields.get("l2-category", "")
        figures[(l2, set_id, figure_id)].append(o.correct)
        questions[(l2, set_id, question_id)].append(o.correct)
    a = _pct(o.correct for _, o in scored)
    f = _pct(all(v) for v in figures.values())
    q = _pct(all(v) for v in questions.values())
    return {"score": (a + f + q) / 3, "aAcc": a, "fAcc": f, "qAcc": q}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def aggregate_mme(scored: Scored) -> dict:
    """Per category: accuracy (questions) + accuracy+ (images whose questions are all right,
    MME's pairs), each in percent, so at most 200 a category; perception is the sum over its
    10 categories, cognition over its 4, and "score" (MME_sum, the paper's column) both:
    at most 2800. Categories absent from the file are listed in "missing_categories"."""
    per_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for item, o in scored:
        per_category[item.fields["category"]][item.image_key].append(o.correct)
    out: dict = {}
    for category, images in sorted(per_category.items()):
        answers = [c for v in images.values() for c in v]
        out[f"category={category}"] = _pct(answers) + _pct(all(v) for v in images.values())
    perception = sum(out.get(f"category={c}", 0.0) for c in MME_PERCEPTION)
    cognition = sum(out.get(f"category={c}", 0.0) for c in MME_COGNITION)
    missing = [c for c in MME_PERCEPTION + MME_COGNITION if f"category={c}" not in out]
    return {"score": perception + cognition, "perception": perception, "cognition": cognition,
            "missing_categories": missing, **out}
