"""Each benchmark's verdict on one prediction, and its metrics over a file, as VLMEvalKit computes them.

A scorer takes an item (r1vl.eval.tsv.Item), the prediction VLMEvalKit would receive (the
model's output after the protocol's answer span, r1vl.eval.protocols) and `ask`, the judge
(None without one), and follows the control flow of VLMEvalKit's evaluate() for that
benchmark: the rule first, the judge only for the items VLMEvalKit sends to it, in its
prompts, with its retries and reply parsing (r1vl.eval.vlmevalkit). Without a judge such an
item is `pending`: counted as "rule-only" and reported, never decided by another rule.

`ask(prompt, temperature, system)` returns the judge's reply, or vlmevalkit.JUDGE_FAILED
when the call failed (VLMEvalKit's wrappers return that same text).

An aggregator turns the verdicts of a file into the metrics VLMEvalKit reports, in percent
(MME in points out of 2800), with "score" the paper's column.
"""
from __future__ import annotations

import math
import string
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r1vl.eval import vlmevalkit as vk
from r1vl.eval import vlmevalkit_math as vkm
from r1vl.eval.tsv import Item


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None = None  # what was read (a letter, Yes/No, the judge's extraction)
    pending: bool = False  # VLMEvalKit would ask the judge, and there is none: undecided, scored wrong
    judged: bool = False  # the judge was asked
    judge_failed: bool = False  # every try of the judge failed (VLMEvalKit's FAIL_MSG)


Ask = Callable[[str, float, "str | None"], str]
Scorer = Callable[[Item, str, "Ask | None", frozenset], Verdict]


def _pending(extracted: str | None = None) -> Verdict:
    return Verdict(False, extracted, pending=True)


def _retry(ask: Ask, prompt: str, tries: int, system: str | None = None, temperatures: bool = True):
    """The judge's first reply that is not FAIL_MSG (temperature 0.5 * try, as VLMEvalKit's
    loops), or None when all `tries` fail."""
    for i in range(tries):
        reply = ask(prompt, 0.5 * i if temperatures else 0.0, system)
        if vk.JUDGE_FAILED not in reply:
            return reply
    return None


# --------------------------------------------------------------------------- scorers

def score_yorn(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """dataset/image_yorn.py ImageYORNDataset.evaluate (MME, HallusionBench): YOrN_Extraction;
    'Unknown' goes to the judge (YOrN_auxeval: up to 5 tries, temperature 0.5*i, until its
    reply reads as Yes/No); right when the gold `answer` equals the reading exactly."""
    fix = "punctuation" in fixes
    said = vk.yorn_extraction(prediction, fix)
    judged = failed = False
    if said == "Unknown":
        if ask is None:
            return _pending()
        judged = True
        prompt = vk.yorn_prompt(item.fields["question"], prediction)
        for i in range(5):
            said = vk.yorn_extraction(ask(prompt, 0.5 * i, None), fix)
            if said != "Unknown":
                break
    return Verdict(item.fields["answer"] == said, said, judged=judged, judge_failed=failed)


def mcq_choices(item: Item) -> dict[str, str]:
    """utils/multiple_choice.py build_choices: the columns A-Z present and not empty (NaN)."""
    return {c: item.fields[c] for c in string.ascii_uppercase if item.fields.get(c, "") != ""}


def score_mcq(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """dataset/image_mcq.py evaluate_heuristic -> utils/multiple_choice.py mcq_vanilla_eval /
    extract_answer_from_item (MMStar): can_infer on the prediction, else the judge's reply
    (build_prompt, up to 3 tries) through can_infer; right when it equals `answer`.
    VLMEvalKit picks a random letter when 3 replies read as nothing; here that is 'Z' (wrong)."""
    choices = mcq_choices(item)
    found = vk.can_infer(prediction, dict(choices))
    judged = failed = False
    if not found:
        if ask is None:
            return _pending()
        judged = True
        question = item.fields["question"]
        build = vk.mcq_prompt_cn if vk.cn_string(question) else vk.mcq_prompt
        prompt = build(question, vk.option_str(choices), prediction)
        for _ in range(3):
            reply = ask(prompt, 0.0, None)
            if vk.JUDGE_FAILED in reply:
                continue
            found = vk.can_infer(reply, dict(choices))
            if found:
                break
        if not found:
            found, failed = "Z", True
    return Verdict(found == item.fields["answer"], found, judged=judged, judge_failed=failed)


def score_chartqa(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """dataset/image_vqa.py ImageVQADataset.evaluate_heuristic with method 'relaxed_accuracy'
    (utils/vqa_eval.py process_line, relaxed_correctness, hit_calculate): the whole stripped
    prediction against each accepted answer; no judge."""
    return Verdict(vk.chartqa_hit(item.fields["answer"], prediction), prediction.strip())


def _prefetched(value, fixes: frozenset) -> bool:
    return value is not False and value is not None if "prefetch-zero" in fixes else bool(value)


def score_mathvista(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """dataset/image_vqa.py MathVista.evaluate_heuristic -> utils/mathvista.py MathVista_auxeval
    and MathVista_acc: post_check on the prediction (prefetch: only a right answer passes);
    otherwise the judge extracts (build_mathvista_gpt4_prompt, 5 tries) and post_check scores
    its reply."""
    fix_text, floats = "mathvista-text" in fixes, "answer" in item.float_columns
    res = vkm.mathvista_post_check(item.fields, prediction, True, fix_text, floats)
    if _prefetched(res, fixes):
        return Verdict(bool(vkm.mathvista_post_check(item.fields, str(res), False, fix_text, floats)), str(res))
    if ask is None:
        return _pending()
    reply = _retry(ask, vkm.mathvista_prompt(item.fields["question"], prediction), 5)
    reply = "" if reply is None else reply
    return Verdict(bool(vkm.mathvista_post_check(item.fields, reply, False, fix_text, floats)), reply, judged=True,
                   judge_failed=reply == "")


def score_mathvision(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """dataset/image_vqa.py MathVision.evaluate_heuristic -> utils/mathv.py MATH_V_auxeval and
    MATH_V_acc: post_check (can_infer for a choices list, else the whole prediction, then
    is_equal); otherwise the judge extracts (build_mathv_gpt4_prompt, 5 tries)."""
    res = vkm.mathv_post_check(item.fields, prediction, True)
    if _prefetched(res, fixes):
        return Verdict(bool(vkm.mathv_post_check(item.fields, str(res), False)), str(res))
    if ask is None:
        return _pending()
    reply = _retry(ask, vkm.mathv_prompt(item.fields["question"], prediction), 5)
    reply = "" if reply is None else reply
    return Verdict(bool(vkm.mathv_post_check(item.fields, reply, False)), reply, judged=True,
                   judge_failed=reply == "")


def score_mathverse(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """dataset/image_vqa.py MathVerse.evaluate -> utils/mathverse.py: every prediction goes to
    the judge twice: MathVerse_auxeval_extract (5 tries), then, unless the extraction equals
    the answer (post_check_score), MathVerse_auxeval_score (5 tries until the reply is 0/1)."""
    if ask is None:
        return _pending()
    extract = _retry(ask, vkm.mathverse_extract_prompt(prediction), 5)
    failed = extract is None
    extract = "" if extract is None else extract
    if vkm.mathverse_post_check_score(item.fields["answer"], extract):
        return Verdict(True, extract, judged=True)
    prompt = vkm.mathverse_score_prompt(item.fields["question_for_eval"], item.fields["answer"], extract)
    for i in range(5):
        reply = ask(prompt, 0.5 * i, None)
        if vk.JUDGE_FAILED not in reply and reply.strip() in ("0", "1"):
            return Verdict(int(reply) == 1, extract, judged=True, judge_failed=failed)
    return Verdict(False, extract, judged=True, judge_failed=True)


def score_dynamath(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """dataset/dynamath.py DynaMath_auxeval: the JSON's "short answer" (parse_answer; a single
    letter upper-cased), else parse_answer on the whole (preprocessed) prediction, else one
    judge call (system prompt set, one try); then the answer_type's rule."""
    kind, answer = item.fields["answer_type"], item.fields["answer"]
    pred = vkm.dynamath_preprocess(prediction)
    short = vkm.dynamath_json_answer(pred, kind)
    judged = False
    if short is not None:
        ok = True
    else:
        ok, short = vkm.dynamath_parse(pred, kind)
        if not ok:
            if ask is None:
                return _pending()
            judged = True
            reply = ask(vkm.dynamath_prompt(pred, kind), 0.0, vkm.DYNAMATH_SYSTEM)
            ok, short = vkm.dynamath_parse(reply, kind)
    try:
        right = vkm.dynamath_verdict(answer, kind, pred, ok, short)
    except ValueError:  # float(answer) fails: VLMEvalKit's worker errors; the item counts wrong
        right = False
    return Verdict(bool(right), None if short is None else str(short), judged=judged)


def score_reference(item: Item, prediction: str, ask: Ask | None, fixes: frozenset = frozenset()) -> Verdict:
    """The trainer's own data (not a VLMEvalKit benchmark): the answer r1vl.eval.extract finds,
    checked by the trainer's answer accuracy (exact final line, then math-verify)."""
    from r1vl.eval import extract
    from r1vl.eval.trainer_api import FINAL_ANSWER, Example, answer_accuracy

    answer, _ = extract.answer_text(prediction)
    if not answer:
        return Verdict(False, answer)
    gold = Example(image_path=Path(item.image_path), problem="", solution=item.fields["solution"])
    return Verdict(answer_accuracy(f"{FINAL_ANSWER}\n{answer}", gold) == 1.0, answer)


# --------------------------------------------------------------------------- aggregators

Scored = list[tuple[Item, Verdict]]


def _pct(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def _by(scored: Scored, column: str, prefix: str | None = None) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, v in scored:
        if column in item.fields:
            groups[item.fields[column]].append(v.correct)
    return {f"{prefix or column}={k}": _pct(g) for k, g in sorted(groups.items())}


def accuracy(columns: tuple[str, ...] = ()) -> Callable[[Scored], dict]:
    """Accuracy in percent ("score", VLMEvalKit's Overall), and by each of `columns` present."""

    def aggregate(scored: Scored) -> dict:
        out = {"score": _pct(v.correct for _, v in scored)}
        for column in columns:
            out.update(_by(scored, column))
        return out

    return aggregate


def aggregate_mathvista(scored: Scored) -> dict:
    """utils/mathvista.py MathVista_acc: Overall, by task and by each skill of `skills` (a list
    literal, else the cell itself)."""
    out = accuracy(("task",))(scored)
    skills: dict[str, list[bool]] = defaultdict(list)
    for item, v in scored:
        if "skills" in item.fields:
            value = vk.literal(item.fields["skills"])
            for skill in value if isinstance(value, (list, tuple)) else [item.fields["skills"]]:
                skills[str(skill)].append(v.correct)
    out.update({f"skill={k}": _pct(g) for k, g in sorted(skills.items())})
    return out


def aggregate_dynamath(scored: Scored) -> dict:
    """dataset/dynamath.py Dynamath.evaluate: average accuracy over all variants ("score") and
    worst case: over the rows with varid 1, a question (`qid`) counts when all its variants
    are right; both by subject and knowledge level too."""
    per_qid: dict[str, bool] = defaultdict(lambda: True)
    for item, v in scored:
        per_qid[item.fields.get("qid", item.index)] &= v.correct
    first = [(item, per_qid[item.fields.get("qid", item.index)]) for item, _ in scored
             if item.fields.get("varid", "1").strip() in ("1", "1.0")]
    out = {"score": _pct(v.correct for _, v in scored), "worst_case": _pct(ok for _, ok in first),
           **_by(scored, "subject"), **_by(scored, "knowledge_level")}
    for column in ("subject", "knowledge_level"):
        groups: dict[str, list[bool]] = defaultdict(list)
        for item, ok in first:
            if column in item.fields:
                groups[item.fields[column]].append(ok)
        out.update({f"worst_case {column}={k}": _pct(g) for k, g in sorted(groups.items())})
    return out


def hallusion_ids(item: Item) -> tuple[str, str, str]:
    """utils/yorn.py Hallusion_rating: set_id, figure_id, question_id are fields 3, 4, 5 of
    the index split on '_' (VLMEvalKit overwrites any columns of those names)."""
    parts = item.index.split("_")
    if len(parts) < 6:
        raise ValueError(f"{item.where()}: the index is not <a>_<b>_<c>_<set>_<figure>_<question>, "
                         "which VLMEvalKit's Hallusion_rating needs")
    return parts[3], parts[4], parts[5]


def _hallusion_accs(scored: Scored) -> tuple[float, float, float]:
    figures: dict[str, list[bool]] = defaultdict(list)
    questions: dict[str, list[bool]] = defaultdict(list)
    for item, v in scored:
        set_id, figure_id, question_id = hallusion_ids(item)
        l2 = item.fields.get("l2-category", "")
        figures[f"{l2}_{set_id}_{figure_id}"].append(v.correct)
        questions[f"{l2}_{set_id}_{question_id}"].append(v.correct)
    return (_pct(v.correct for _, v in scored), _pct(all(g) for g in figures.values()),
            _pct(all(g) for g in questions.values()))


def aggregate_hallusion(scored: Scored) -> dict:
    """utils/yorn.py Hallusion_rating: aAcc (questions), fAcc (a figure, keyed
    l2-category_set_figure, counts when all its questions are right), qAcc (a question,
    keyed l2-category_set_question, counts when right for every figure); Overall and per
    `category` and `l2-category`. "score" is the mean of the three Overall values (the
    OpenCompass leaderboard's number, which the paper's HallBench column reproduces)."""
    a, f, q = _hallusion_accs(scored)
    out = {"score": (a + f + q) / 3, "aAcc": a, "fAcc": f, "qAcc": q}
    for column in ("category", "l2-category"):
        groups: dict[str, Scored] = defaultdict(list)
        for item, v in scored:
            if column in item.fields:
                groups[item.fields[column]].append((item, v))
        for key, sub in sorted(groups.items()):
            sa, sf, sq = _hallusion_accs(sub)
            out.update({f"{column}={key} aAcc": sa, f"{column}={key} fAcc": sf, f"{column}={key} qAcc": sq})
    return out


MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                  "posters", "scene")
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


def aggregate_mme(scored: Scored) -> dict:
    """utils/yorn.py MME_rating: per category, accuracy over questions + accuracy+ over images
    (`image_path`, else the row holding the image; VLMEvalKit multiplies the image's first
    two verdicts), in percent; perception sums its 10 categories, cognition (VLMEvalKit's
    "reasoning") its 4; "score" = both (MME_sum, at most 2800). VLMEvalKit stops on a file
    without every category; here those are listed in "missing_categories"."""
    per_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for item, v in scored:
        per_category[item.fields["category"]][item.image_key].append(v.correct)
    out: dict = {}
    for category, images in sorted(per_category.items()):
        answers = [c for g in images.values() for c in g]
        plus = [g[0] and g[1] if len(g) >= 2 else None for g in images.values()]
        if any(p is None for p in plus):
            raise ValueError(f"MME category {category}: an image with one question (VLMEvalKit's MME_rating "
                             "needs the pair)")
        out[f"category={category}"] = _pct(answers) + _pct(plus)
    perception = sum(out.get(f"category={c}", 0.0) for c in MME_PERCEPTION)
    cognition = sum(out.get(f"category={c}", 0.0) for c in MME_COGNITION)
    missing = [c for c in MME_PERCEPTION + MME_COGNITION if f"category={c}" not in out]
    return {"score": perception + cognition, "perception": perception, "cognition": cognition,
            "missing_categories": missing, **out}


def is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)
