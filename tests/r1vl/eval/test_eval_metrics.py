"""Each benchmark's rule and metric: a small TSV in its layout, hand-written predictions
covering every rule, and the expected scores worked out by hand."""
import pytest
from evalkit_files import final, png_b64, write_predictions, write_tsv

from r1vl.eval import benchmarks
from r1vl.eval.score import score_benchmark


def _score(tmp_path, name, rows, predictions, judge=None):
    bench = benchmarks.get(name)
    table = benchmarks.load(bench, write_tsv(tmp_path / f"{name}.tsv", rows))
    write_predictions(tmp_path / "out" / bench.name, predictions)
    return score_benchmark(bench, table, tmp_path / "out" / bench.name, judge)


def _correct(tmp_path, name):
    import json

    lines = (tmp_path / "out" / benchmarks.get(name).name / "scored.jsonl").read_text().splitlines()
    return {r["index"]: r["correct"] for r in map(json.loads, lines)}


def test_mmstar(tmp_path):
    q = {"question": "How many?", "A": "3", "B": "4", "C": "5", "D": "6", "category": "math"}
    rows = [{"index": "0", **q, "answer": "B"}, {"index": "1", **q, "answer": "C"},
            {"index": "2", **q, "answer": "A"}, {"index": "3", **q, "answer": "D"},
            {"index": "4", **q, "answer": "A"}]
    r = _score(tmp_path, "MMStar", rows, {
        "0": final("(B)"),  # letter
        "1": final("5"),  # option text -> C
        "2": final("D"),  # wrong letter
        "3": "I am not sure",  # no letter: unparsed, wrong
    })  # "4": no prediction yet
    assert r["score"] == pytest.approx(50.0)  # 2 right of 4 scored
    assert r["counts"]["missing"] == 1 and r["counts"]["unparsed"] == 1
    assert r["counts"]["scored"] == 4 and not r["complete"]
    assert r["metrics"]["category=math"] == pytest.approx(50.0)


def test_mathvista(tmp_path):
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": "['145°', '135°', '125°']",
          "answer": "135°"}
    free = {"question_type": "free_form", "choices": ""}
    rows = [
        {"index": "0", "question": "Angle?", **mc, "answer_option": "B", "task": "geometry"},
        {"index": "1", "question": "Angle?", **mc, "task": "geometry"},  # gold letter from the answer text
        {"index": "2", "question": "Count?", **free, "answer_type": "integer", "answer": "3"},
        {"index": "3", "question": "Len?", **free, "answer_type": "float", "precision": "2", "answer": "1.45"},
        {"index": "4", "question": "Len?", **free, "answer_type": "float", "precision": "1", "answer": "0.6"},
        {"index": "5", "question": "Count?", **free, "answer_type": "integer", "answer": "7"},
        {"index": "6", "question": "Which?", **free, "answer_type": "list", "answer": "[1, 2]"},
        {"index": "7", "question": "Word?", **free, "answer_type": "text", "answer": "hello"},
    ]
    r = _score(tmp_path, "MathVista", rows, {
        "0": final("B"),
        "1": final("125°"),  # option text -> C, gold B: wrong
        "2": "The answer is 3.",  # phrase fallback
        "3": final("1.4499"),  # rounds to the gold 1.45 at precision 2
        "4": final("0.66"),  # rounds to 0.7 at precision 1: wrong
        "5": final("7.5"),  # not an integer: wrong
        "6": final("[1, 2]"),
        "7": final("Hello"),
    })
    assert _correct(tmp_path, "MathVista") == {"0": True, "1": False, "2": True, "3": True, "4": False,
                                              "5": False, "6": True, "7": True}
    assert r["score"] == pytest.approx(62.5) and r["complete"]
    assert r["metrics"]["task=geometry"] == pytest.approx(50.0)


def test_mathvision(tmp_path):
    mc = {"choices": "['1', '2', '3', '4', '5']"}
    rows = [{"index": "0", "question": "Which?", **mc, "answer": "C"},
            {"index": "1", "question": "Half?", "choices": "[]", "answer": "\\frac{1}{2}"},
            {"index": "2", "question": "Half?", "choices": "[]", "answer": "0.5"},
            {"index": "3", "question": "Count?", "choices": "[]", "answer": "12"},
            {"index": "4", "question": "Which?", **mc, "answer": "A"}]
    r = _score(tmp_path, "MathVision", rows, {
        "0": final("3"),  # option text -> C
        "1": final("1/2"),  # the same after LaTeX normalization
        "2": final("1/2"),  # the same number
        "3": "so \\boxed{13}",  # wrong number
        "4": final("A and B"),  # two letters: unparsed
    })
    assert r["score"] == pytest.approx(60.0) and r["counts"]["unparsed"] == 1


def test_chartqa_relaxed_accuracy(tmp_path):
    rows = [{"index": "0", "question": "q", "answer": "50", "split": "human"},
            {"index": "1", "question": "q", "answer": "50", "split": "human"},
            {"index": "2", "question": "q", "answer": "Yes", "split": "human"},
            {"index": "3", "question": "q", "answer": "0", "split": "augmented"},
            {"index": "4", "question": "q", "answer": "12", "split": "augmented"},
            {"index": "5", "question": "q", "answer": "['a', 'b']", "split": "augmented"}]
    r = _score(tmp_path, "ChartQA", rows, {
        "0": final("52"),  # 4% off: right
        "1": final("53"),  # 6% off: wrong
        "2": final("yes"),  # strings ignore case
        "3": final("0.01"),  # a zero target needs the exact string
        "4": final("12%"),  # the % is dropped on both sides
        "5": final("b"),  # any accepted answer
    })
    assert _correct(tmp_path, "ChartQA") == {"0": True, "1": False, "2": True, "3": False, "4": True, "5": True}
    assert r["score"] == pytest.approx(400 / 6)
    assert r["metrics"]["split=human"] == pytest.approx(200 / 3)


def test_dynamath_average_and_worst_case(tmp_path):
    base = {"question": "q", "subject": "algebra", "knowledge_level": "high school"}
    rows = [{"index": "0", **base, "qid": "1", "varid": "1", "answer_type": "multiple choice", "answer": "B"},
            {"index": "1", **base, "qid": "1", "varid": "2", "answer_type": "multiple choice", "answer": "C"},
            {"index": "2", **base, "qid": "2", "varid": "1", "answer_type": "float", "answer": "3.142"},
            {"index": "3", **base, "qid": "2", "varid": "2", "answer_type": "float", "answer": "2.5"},
            {"index": "4", **base, "qid": "3", "varid": "1", "answer_type": "free form", "answer": "y = 2x + 1"}]
    r = _score(tmp_path, "DynaMath", rows, {
        "0": '{"solution": "...", "short answer": "B"}',  # DynaMath's own JSON format
        "1": final("C"),
        "2": final("π"),  # 3.14159: within 0.001 of 3.142
        "3": final("2.502"),  # 0.002 off: wrong
        "4": final("2x + 1"),  # DynaMath's free-form rule: contained in the gold answer
    })
    assert r["score"] == pytest.approx(80.0)  # 4 of 5 variants
    assert r["metrics"]["worst_case"] == pytest.approx(200 / 3)  # questions 1 and 3 of 3


def test_hallusionbench_aacc_facc_qacc(tmp_path):
    # VLMEvalKit's index: fields 3, 4, 5 are set, figure and question ids.
    rows = [{"index": "VS_chart_x_1_0_0", "question": "q", "answer": "Yes", "l2-category": "chart"},
            {"index": "VS_chart_x_1_0_1", "question": "q", "answer": "No", "l2-category": "chart"},
            {"index": "VS_chart_x_1_1_0", "question": "q", "answer": "No", "l2-category": "chart"},
            {"index": "VS_chart_x_1_1_1", "question": "q", "answer": "No", "l2-category": "chart"}]
    r = _score(tmp_path, "HallusionBench", rows, {
        "VS_chart_x_1_0_0": final("Yes"),
        "VS_chart_x_1_0_1": final("No, it is not."),
        "VS_chart_x_1_1_0": final("Yes"),  # wrong
        "VS_chart_x_1_1_1": final("yes and no"),  # unparsed
    })
    m = r["metrics"]
    assert m["aAcc"] == pytest.approx(50.0)  # 2 of 4 questions
    assert m["fAcc"] == pytest.approx(50.0)  # figure 0 all right, figure 1 not
    assert m["qAcc"] == pytest.approx(0.0)  # question 0 and question 1 each wrong on figure 1
    assert r["score"] == pytest.approx(100 / 3)


def test_hallusionbench_id_columns(tmp_path):
    rows = [{"index": str(i), "question": "q", "answer": a, "set_id": "0", "figure_id": f, "question_id": q}
            for i, (a, f, q) in enumerate([("Yes", "0", "0"), ("No", "1", "0")])]
    r = _score(tmp_path, "HallBench", rows, {"0": "Yes", "1": "Yes"})
    assert (r["metrics"]["aAcc"], r["metrics"]["fAcc"], r["metrics"]["qAcc"]) == (50.0, 50.0, 0.0)


def test_mathverse(tmp_path):
    rows = [{"index": "0", "question": "q (A) 1 (B) 2", "answer": "B", "question_type": "multi-choice",
             "problem_version": "Vision Only"},
            {"index": "1", "question": "q", "answer": "A", "question_type": "multi-choice",
             "problem_version": "Vision Only"},
            {"index": "2", "question": "q", "answer": "5", "question_type": "free-form",
             "problem_version": "Vision Only"},
            {"index": "3", "question": "q", "answer": "\\sqrt{2}", "question_type": "free-form",
             "problem_version": "Vision Only"}]
    r = _score(tmp_path, "MathVerse", rows, {
        "0": final("B"), "1": final("(C) 30°"), "2": final("5 cm"), "3": final("\\sqrt{2}")})
    assert _correct(tmp_path, "MathVerse") == {"0": True, "1": False, "2": True, "3": True}
    assert r["score"] == pytest.approx(75.0)


def test_mme_pairs_acc_plus(tmp_path):
    # Each image carries two questions; the second row refers to the first one's image by index.
    img1, img2, img3 = png_b64((1, 2, 3)), png_b64((4, 5, 6)), png_b64((7, 8, 9))
    rows = [{"index": "1", "image": img1, "question": "q", "answer": "Yes", "category": "existence"},
            {"index": "2", "image": "1", "question": "q", "answer": "No", "category": "existence"},
            {"index": "3", "image": img2, "question": "q", "answer": "Yes", "category": "existence"},
            {"index": "4", "image": "3", "question": "q", "answer": "No", "category": "existence"},
            {"index": "5", "image": img3, "question": "q", "answer": "Yes", "category": "code_reasoning"},
            {"index": "6", "image": "5", "question": "q", "answer": "No", "category": "code_reasoning"}]
    r = _score(tmp_path, "MME", rows, {"1": "Yes", "2": final("No"), "3": "Yes.", "4": "Yes",
                                       "5": "No", "6": "No"})
    m = r["metrics"]
    assert m["category=existence"] == pytest.approx(75.0 + 50.0)  # 3 of 4 questions, 1 of 2 images
    assert m["category=code_reasoning"] == pytest.approx(50.0 + 0.0)
    assert (m["perception"], m["cognition"], r["score"]) == (125.0, 50.0, 175.0)
    assert "count" in m["missing_categories"] and "existence" not in m["missing_categories"]


def test_mme_pairs_by_image_path(tmp_path):
    """With an image_path column (VLMEvalKit's MME), questions pair by it, not by row."""
    rows = [{"index": str(i), "image_path": f"{i // 2}.jpg", "question": "q", "answer": a, "category": "OCR"}
            for i, a in enumerate(["Yes", "No", "Yes", "No"])]
    r = _score(tmp_path, "MME", rows, {"0": "Yes", "1": "No", "2": "Yes", "3": "Yes"})
    assert r["metrics"]["category=OCR"] == pytest.approx(75.0 + 50.0) and r["score"] == pytest.approx(125.0)


def test_mathvista_number_forms(tmp_path):
    free = {"question": "q", "question_type": "free_form", "choices": ""}
    rows = [{"index": "0", **free, "answer_type": "integer", "answer": "1,000"},
            {"index": "1", **free, "answer_type": "float", "precision": "nan", "answer": "2.25"},
            {"index": "2", **free, "answer_type": "float", "answer": "0.7"}]  # no precision: the gold's 1 decimal
    r = _score(tmp_path, "MathVista", rows, {"0": final("1000"), "1": final("2.251"), "2": final("0.66")})
    assert r["score"] == pytest.approx(100.0)
