"""r1vl.eval.extract: the answer in an output, option letters, yes/no, numbers."""
import math

import pytest
from evalkit_files import final

from r1vl.eval import extract


@pytest.mark.parametrize("prediction, answer, rule", [
    (final("B"), "B", "final"),
    (final("**12 cm**."), "12 cm", "final"),  # markdown and the full stop go, the number stays
    (final("$\\frac{1}{2}$"), "\\frac{1}{2}", "final"),
    ('Steps... {"solution": "add", "short answer": "3.142"}', "3.142", "json"),
    ("so the area is \\boxed{\\frac{3}{4}} and \\boxed{7}", "7", "boxed"),
    ("nested \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}", "boxed"),
    ("First... The answer is 2.5.\nThanks", "2.5", "phrase"),
    ("Working.\nAnswer: C", "C", "phrase"),
    ("  Yes  ", "Yes", "whole"),
])
def test_answer_text(prediction, answer, rule):
    assert extract.answer_text(prediction) == (answer, rule)


def test_final_answer_section_wins_over_the_fallbacks():
    text = "The answer is 4. \\boxed{5}\n" + final("6")
    assert extract.answer_text(text) == ("6", "final")


def test_unbalanced_boxed_and_huge_output_stay_fast():
    text = "\\boxed{" + "{" * 100_000 + "x" * 1_000_000
    answer, rule = extract.answer_text(text)
    assert rule == "whole"


OPTIONS = {"A": "3", "B": "45", "C": "triangle", "D": "None of these"}


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("(C)", "C"), ("B. 45", "B"), ("(B) 45", "B"), ("Option D", "D"), ("option d", "D"),
    ("45", "B"), ("Triangle.", "C"),  # by option text
    ("I choose A because", "A"),  # one letter alone among the words
    ("A or B", None), ("E", None), ("", None), ("forty-five", None),
    ("it is a triangle shape", "C"),  # one option's text inside the answer
])
def test_choice_letter(answer, letter):
    assert extract.choice_letter(answer, OPTIONS) == letter


def test_options_from_list_never_evaluates():
    assert extract.options_from_list("['1', 2, '3/4']", "f") == {"A": "1", "B": "2", "C": "3/4"}
    assert extract.options_from_list("[]", "f") == {} and extract.options_from_list("", "f") == {}
    with pytest.raises(ValueError, match="row 3.*not a list literal"):
        extract.options_from_list("__import__('os').system('true')", "row 3")
    with pytest.raises(ValueError, match="list of at most 26"):
        extract.options_from_list("{'a': 1}", "row 3")


@pytest.mark.parametrize("answer, said", [
    ("Yes", "Yes"), ("No.", "No"), ("yes, it is red", "Yes"), ("NO", "No"),
    ("yes and no", None), ("I cannot tell", None), ("Nope", None),
])
def test_yes_no(answer, said):
    assert extract.yes_no(answer) == said


@pytest.mark.parametrize("answer, value", [
    ("12", 12.0), ("-2.5", -2.5), ("1,234", 1234.0), ("$12", 12.0), ("12 cm", 12.0), ("x = 3", 3.0),
    ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("\\dfrac{1}{2}", 0.5), ("30°", 30.0), ("6.0", 6.0),
    ("2π", 2 * math.pi), ("\\pi", math.pi), ("12%", 12.0), ("\u22125", -5.0),
    ("3 or 4", None), ("", None), ("seven", None), ("1/0", None),
])
def test_to_number(answer, value):
    got = extract.to_number(answer)
    assert (got is None and value is None) or got == pytest.approx(value)


def test_to_number_percent_and_lists():
    assert extract.to_number("12%", percent=True) == pytest.approx(0.12)
    assert extract.number_list("[1, 2.5]") == [1.0, 2.5]
    assert extract.number_list("1, x") is None


def test_same_text():
    assert extract.same_text("\\frac{1}{2}", "1/2")
    assert extract.same_text("Hello.", "hello")
    assert not extract.same_text("12", "13")
