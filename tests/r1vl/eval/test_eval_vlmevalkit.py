"""Conformance with VLMEvalKit: each case is a prediction on one side of a rule, with the verdict
VLMEvalKit's own function gives (the file and function named beside it; verdicts obtained by
running those functions on these inputs), plus the judge prompts a stub endpoint receives."""
import pytest
from evalkit_files import png_b64, write_tsv

from r1vl.eval import benchmarks, protocols, verdicts
from r1vl.eval import vlmevalkit as vk
from r1vl.eval import vlmevalkit_math as vkm
from r1vl.eval.judge import Judge
from r1vl.eval.tsv import Item


def item(index="1", **fields) -> Item:
    return Item("f.tsv", 1, index, {"index": index, **fields}, "", "", index)


@pytest.mark.parametrize("prediction, verdict", [
    ("Yes", "Yes"), ("no.", "No"), ("Yes, no doubt", "Unknown"), ("yes-ish", "Yes"),
    ("(yes)", "Yes"), ("maybe", "Unknown"),
])
def test_yorn_extraction(prediction, verdict):
    # vlmeval/dataset/utils/yorn.py YOrN_Extraction (with smp/misc.py process_punctuation)
    assert vk.yorn_extraction(prediction) == verdict


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("The answer is (C).", "C"), ("A cat sits. It is B", "A"), ("B and C", False),  # two letters: the option text "cat" decides
    ("B is right because of the first figure here", False),  # letter not among the last four words
    ("The correct answer is **D**, since", "D"), ("dog", "D"), ("Cannot determine the answer", "Z"),
])
def test_can_infer(prediction, letter):
    # vlmeval/utils/matching_util.py can_infer (can_infer_option, then can_infer_text)
    assert vk.can_infer(prediction, {"A": "cat", "B": "rabbit", "C": "mouse", "D": "dog"}) == letter


@pytest.mark.parametrize("answer, prediction, right", [
    ("100", "104", True), ("100", "106", False), ("100", "95", True), ("100", "94.9", False),
    ("0", "0", True), ("0", "0.0", False), ("0", "0.01", False),  # zero: exact string only
    ("12%", "0.12", True), ("12", "12%", False), ("Blue", "blue", True), ("45", "**45**", False),
    ("['a', 'b']", "b", True), ("45", " 45 ", True),
])
def test_chartqa_relaxed_accuracy(answer, prediction, right):
    # vlmeval/dataset/utils/vqa_eval.py process_line(method='relaxed_accuracy') + relaxed_correctness
    assert vk.chartqa_hit(answer, prediction) is right


MV_INT = dict(question="q", question_type="free_form", answer_type="integer", answer="3", choices="[]",
              answer_option="")
MV_MC = dict(question="q", question_type="multi_choice", answer_type="text", answer="4", choices="['3', '4']",
             answer_option="B")
MV_TEXT = dict(question="q", question_type="free_form", answer_type="text", answer="red", choices="[]",
               answer_option="")


@pytest.mark.parametrize("fields, prediction, verdict", [
    (MV_INT, "3", True), (MV_INT, "3.0", None), (MV_INT, "4", None),  # None: sent to the judge
    (MV_MC, "B", True), (MV_MC, "4", True),
    (MV_MC, "A", False),  # multi_choice prefetch returns any letter it reads: wrong, never judged
    (MV_MC, "no idea", None),
    (MV_TEXT, "red", None),  # post_check compares str(None): text answers always go to the judge
])
def test_mathvista_prefetch(fields, prediction, verdict):
    # vlmeval/dataset/utils/mathvista.py MathVista_auxeval -> post_check(prefetch=True)
    v = verdicts.score_mathvista(item(**fields), prediction, None)
    assert (None if v.pending else v.correct) == verdict
    if fields is MV_TEXT:  # --fix mathvista-text scores it
        assert verdicts.score_mathvista(item(**fields), prediction, None, frozenset({"mathvista-text"})).correct


@pytest.mark.parametrize("answer, prediction, right", [
    ("14", "14", True), ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("2", "\\sqrt{2}", False),
    ("\\sqrt{2}", "\\sqrt{2}", True), ("3", "x=3", False),
])
def test_mathv_is_equal(answer, prediction, right):
    # vlmeval/dataset/utils/mathv.py is_equal
    assert vkm.mathv_is_equal(prediction, answer) is right


@pytest.mark.parametrize("kind, answer, prediction, verdict", [
    ("multiple choice", "B", '{"solution": "s", "short answer": "b"}', True),  # single letter upper-cased
    ("multiple choice", "B", "b", True), ("multiple choice", "B", "I pick the second", None),
    ("float", "3.142", '{"short answer": "3.1425"}', True), ("float", "3.142", "3.15 cm", False),
    ("float", "3.142", "about pi", None), ("free form", "x^2+1", "X^2", True),
])
def test_dynamath(kind, answer, prediction, verdict):
    # vlmeval/dataset/dynamath.py DynaMath_auxeval (preprocess, parse_answer)
    v = verdicts.score_dynamath(item(answer_type=kind, answer=answer, question="q"), prediction, None)
    assert (None if v.pending else v.correct) == verdict


def test_paper_protocol_span_and_hallusion_mapping():
    # R1-VL eval/qwen2_vl/model.py generate_inner
    out = "### Step 1:\nlook\n### The final answer is: A: Yes"
    assert protocols.prediction("HallusionBench", out, "paper") == "Yes"
    assert protocols.prediction("HallusionBench", "The final answer is: B", "paper") == "No"
    assert protocols.prediction("HallusionBench", "The final answer is: The answer is B", "paper") == "Yes"
    assert protocols.prediction("HallusionBench", "The final answer is: The answer is B", "paper",
                                frozenset({"paper-hallusion"})) == "No"
    assert protocols.prediction("MathVista", "x The final answer is: 12 cm\nmore", "paper") == "12 cm\nmore"
    assert protocols.prediction("MathVista", "The final answer is: 1 The final answer is: 2", "paper").startswith("The")
    hb = item("VS_chart_1_0_0_0", question="Is it red? Please answer yes or no.", answer="Yes")
    assert "Question: Is it red? \nChoices:\nA: Yes\nB: No" in protocols.question("HallusionBench", hb, "paper")


def test_metrics_mme_and_hallusion():
    # vlmeval/dataset/utils/yorn.py MME_rating (acc + acc+ per image) and Hallusion_rating
    rows = [(item(str(i), category="count", answer="Yes"), verdicts.Verdict(ok))
            for i, ok in enumerate([True, True, True, False])]
    rows = [(Item("f", 1, it.index, it.fields, "", "", f"img{int(it.index) // 2}"), v) for it, v in rows]
    m = verdicts.aggregate_mme(rows)
    assert m["category=count"] == 75.0 + 50.0 and m["perception"] == 125.0
    hall = [(item(f"VS_c_x_{s}_{f}_{q}", **{"l2-category": "chart"}), verdicts.Verdict(ok))
            for (s, f, q), ok in [(("0", "0", "0"), True), (("0", "1", "0"), False), (("0", "0", "1"), True)]]
    m = verdicts.aggregate_hallusion(hall)
    assert (m["aAcc"], m["fAcc"], m["qAcc"]) == (pytest.approx(200 / 3), 50.0, 50.0)


def test_hallusion_figures_and_questions_are_not_interchangeable():
    # vlmeval/dataset/utils/yorn.py Hallusion_rating: figure_id is field 4 of the index and
    # question_id field 5. One set, figure 0 asked questions 0, 1, 2 (the last one wrong) and
    # figure 1 asked question 0: fAcc = 1 of 2 figures all right, qAcc = 2 of 3 questions right
    # for every figure. With the two fields swapped it would be fAcc 66.7, qAcc 50.
    cases = [(("0", "0"), True), (("0", "1"), True), (("0", "2"), False), (("1", "0"), True)]
    hall = [(item(f"VS_c_x_0_{f}_{q}", **{"l2-category": "chart"}), verdicts.Verdict(ok)) for (f, q), ok in cases]
    assert [verdicts.hallusion_ids(it) for it, _ in hall] == [("0", f, q) for (f, q), _ in cases]
    m = verdicts.aggregate_hallusion(hall)
    assert (m["aAcc"], m["fAcc"], m["qAcc"]) == (75.0, 50.0, pytest.approx(200 / 3))
    assert m["score"] == pytest.approx((75.0 + 50.0 + 200 / 3) / 3)


def test_empty_image_rows_are_skipped_and_counted(tmp_path):
    # vlmeval/dataset/image_base.py ImageBaseDataset(skip_noimg=True); MME-style reference to another row
    rows = [{"index": "VS_c_x_0_0_0", "image": png_b64(), "question": "q", "answer": "Yes"},
            {"index": "VS_c_x_0_0_1", "image": "", "question": "q", "answer": "No"},
            {"index": "VS_c_x_0_1_0", "image": "VS_c_x_0_0_0", "question": "q", "answer": "No"}]
    for skip in (False, True):
        table = benchmarks.load(benchmarks.get("HallusionBench"), write_tsv(tmp_path / "h.tsv", rows), skip)
        assert [i.index for i in table.items] == ["VS_c_x_0_0_0", "VS_c_x_0_1_0"]
        assert table.no_image == ["VS_c_x_0_0_1"]


def test_judge_prompts_match_vlmevalkit(chat_server):
    # The stub records what reaches it: VLMEvalKit's prompt builders' text, byte for byte
    # (utils/yorn.py YOrN_match_prompt, utils/mathvista.py build_mathvista_gpt4_prompt).
    server = chat_server(lambda text: "No" if "Yes / No" in text else "3")
    judge = Judge(server.url)
    ask = lambda p, t, s: judge(p, t, s)  # noqa: E731
    v = verdicts.score_yorn(item(question="Is it red", answer="No"), "It is not red.", ask)
    assert v.correct and v.judged
    sent = server.requests[-1]["body"]["messages"][-1]["content"]
    assert sent.startswith("You are an AI assistant who will help me to match an answer with two options")
    assert sent.endswith("Example 3: \nQuestion: Is it red?\nAnswer: It is not red.\nYour output: ")
    v = verdicts.score_mathvista(item(**MV_INT), "three apples", ask)
    assert v.correct and v.judged
    sent = server.requests[-1]["body"]["messages"][-1]["content"]
    assert sent == vkm.mathvista_prompt("q", "three apples")
    assert sent.endswith("Extracted answer: B\n\nq\nModel respone: three applesExtracted answer:")
