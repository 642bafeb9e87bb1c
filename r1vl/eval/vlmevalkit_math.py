"""VLMEvalKit's rules for the math benchmarks, re-implemented rule for rule: MathVista,
MathVision, MathVerse and DynaMath, their answer post-checks and their judge prompts
(reproduced byte for byte, in-context examples included). The shared rules are in
r1vl.eval.vlmevalkit; every function names the VLMEvalKit function it reproduces.
"""
from __future__ import annotations

import json
import math

from r1vl.eval.vlmevalkit import MISSING, arithmetic, can_infer, literal

# --------------------------------------------------------------------------- utils/mathvista.py, mathv.py

def _ice_mathvista() -> list[str]:
    """utils/mathvista.py get_gpt4_ICE (text reproduced exactly)."""
    return [
        "\nHint: Please answer the question requiring an integer answer and provide the final value,\n"
        "e.g., 1, 2, 3, at the end.\n\nQuestion: Which number is missing?\n\n"
        "Model response: The number missing in the sequence is 14.\n\nExtracted answer: 14\n",
        "\nHint: Please answer the question requiring a floating-point number with one decimal place and "
        "provide the final value,\ne.g., 1.2, 1.3, 1.4, at the end.\n\n"
        "Question: What is the fraction of females facing the camera?\n\n"
        "Model response: The fraction of females facing the camera is 0.6,\n"
        "which means that six out of ten females in the group are facing the camera.\n\nExtracted answer: 0.6\n",
        "\nHint: Please answer the question requiring a floating-point number with two decimal places and "
        "provide the final value,\ne.g., 1.23, 1.34, 1.45, at the end.\n\n"
        "Question: How much money does Luca need to buy a sour apple candy and a butter-scotch candy? "
        "(Unit: $)\n\nModel response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.\n\n"
        "Extracted answer: 1.45\n",
        "\nHint: Please answer the question requiring a Python list as an answer and provide the final list,\n"
        "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.\n\n"
        "Question: Between which two years does the line graph saw its maximum peak?\n\n"
        "Model response: The line graph saw its maximum peak between 2007 and 2008.\n\n"
        "Extracted answer: [2007, 2008]\n",
        _ICE_LETTER,
    ]


_ICE_LETTER = (
    "\nHint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n\n"
    "Question: What fraction of the shape is blue?\n\n"
    "Choices: (A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5\n\n"
    "Model response: The correct answer is (B) 8/11.\n\nExtracted answer: B\n")
_HINT_FINAL = "\nHint: Please answer the question and provide the final answer at the end.\n\n"


def _ice_mathv() -> list[str]:
    """utils/mathv.py get_gpt4_ICE (text reproduced exactly)."""
    return [
        _HINT_FINAL + "Question: Which number is missing?\n\n"
        "Model response: The number missing in the sequence is 14.\n\nExtracted answer: 14\n",
        _HINT_FINAL + "Question: What is the fraction of females facing the camera?\n\n"
        "Model response: The fraction of females facing the camera is 0.6,\n"
        "which means that six out of ten females in the group are facing the camera.\n\nExtracted answer: 0.6\n",
        _HINT_FINAL + "Question: How much money does Luca need to buy a sour apple candy and a butter-scotch "
        "candy? (Unit: $)\n\nModel response: Luca needs $1.45 to buy a sour apple candy and a butterscotch "
        "candy.\n\nExtracted answer: 1.45\n",
        _HINT_FINAL + "Question: Between which two years does the line graph saw its maximum peak?\n\n"
        "Model response: The line graph saw its maximum peak between 2007 and 2008.\n\n"
        "Extracted answer: [2007, 2008]\n",
        _ICE_LETTER,
    ]


_EXTRACT_TASK = ("\nPlease read the following example.\n"
                 "Then extract the answer from the model response and type it at the end of the prompt.\n\n")


def _extract_prompt(examples: list[str], question: str, prediction: str) -> str:
    return _EXTRACT_TASK + "".join(e + "\n" for e in examples) + question + "\n" + \
        "Model respone: " + prediction + "Extracted answer:"


def mathvista_prompt(question: str, prediction: str) -> str:
    """utils/mathvista.py build_mathvista_gpt4_prompt."""
    return _extract_prompt(_ice_mathvista(), question, prediction)


def mathv_prompt(question: str, prediction: str) -> str:
    """utils/mathv.py build_mathv_gpt4_prompt."""
    return _extract_prompt(_ice_mathv(), question, prediction)


def list_to_dict(values) -> dict:
    return {chr(65 + i): v for i, v in enumerate(values)}


def mathvista_post_check(fields: dict, response: str, prefetch: bool, fix_text: bool = False,
                         answer_float: bool = False):
    """utils/mathvista.py post_check. multi_choice: can_infer's letter against answer_option;
    integer / float: int()/float() of the response equal to that of the answer; otherwise
    str(None) against the answer (never right; fix_text compares the response itself).
    prefetch: the inferred answer when right, else False; otherwise True/False. answer_float:
    pandas read the answer column as float64 (int() of 3.0 is 3, where int('3.0') fails)."""
    res, ans = None, fields['answer']
    try:
        if fields['question_type'] == 'multi_choice':
            ans = fields['answer_option']
            choices = literal(fields['choices'])
            if choices is MISSING:
                raise ValueError
            res = can_infer(response, list_to_dict(choices))
            if prefetch:
                return res
        elif fields['answer_type'] == 'integer':
            res = int(response)
            ans = int(float(fields['answer'])) if answer_float else int(fields['answer'])
        elif fields['answer_type'] == 'float':
            res = float(response)
            ans = float(fields['answer'])
        else:
            res = str(response if fix_text else res)
            ans = str(ans)
    except ValueError:
        pass
    if res == ans:
        return res if prefetch else True
    return False


def mathv_is_equal(asw, gt_asw) -> bool:
    """utils/mathv.py is_equal: the same lowercased text, or values within 1e-6, first as
    Python arithmetic (eval there), then as LaTeX (latex2sympy)."""
    asw, gt_asw = str(asw).lower().strip(), str(gt_asw).lower().strip()
    if gt_asw == asw:
        return True
    try:
        if abs(arithmetic(gt_asw) - arithmetic(asw)) < 1e-6:
            return True
    except (ValueError, TypeError, ArithmeticError):
        pass
    if max(len(asw), len(gt_asw)) > 2000:  # VLMEvalKit gives up after 30 s; a long response never parses
        return False
    try:
        from latex2sympy2_extended import latex2sympy

        a, b = latex2sympy(gt_asw), latex2sympy(asw)
        try:
            if abs(arithmetic(str(a)) - arithmetic(str(b))) < 1e-6:
                return True
        except (ValueError, TypeError, ArithmeticError):
            pass  # eval(str(sympy)) fails on names (sqrt, pi): VLMEvalKit's try moves on
        if bool(abs(a - b) < 1e-6):
            return True
    except Exception:  # noqa: BLE001  (VLMEvalKit: any failure of the LaTeX route is "not equal")
        pass
    return False


def mathv_post_check(fields: dict, response: str, prefetch: bool):
    """utils/mathv.py post_check: a non-empty `choices` list: can_infer's letter; otherwise the
    whole response; then is_equal against the answer."""
    res, ans = None, fields['answer']
    choices = literal(fields['choices'])
    if choices is MISSING:
        raise ValueError(f"choices is not a list literal: {str(fields['choices'])[:80]!r}")
    if len(choices) > 0:
        res = can_infer(response, list_to_dict(choices))
        if prefetch:
            return res
    else:
        res, ans = str(response), str(ans)
    return (res if prefetch else True) if mathv_is_equal(res, ans) else False


# --------------------------------------------------------------------------- utils/mathverse.py

def mathverse_extract_prompt(prediction: str) -> str:
    """utils/mathverse.py build_mathverse_gpt4_extract_prompt (text reproduced exactly)."""
    task = ("\nI am providing you a response from a model to a math problem, termed 'Model Response'. You should "
            "extract the answer from the response as 'Extracted Answer'. Directly output the extracted answer "
            "with no explanation.\n\n\n")
    examples = [
        "\n1.\nModel response: 'Rounded to two decimal places, the perimeter of the sector is approximately:\n\n"
        "(-2, 1)'\nExtracted Answer: (-2, 1)\n",
        "\n2.\nModel response: 'at those points.\n\nTherefore, the correct option that represents the meaning of "
        "the intersection points of the graphs is:\n\nD. They give the solutions to the equation $f(t)=g(t)$.\","
        "'\nExtracted Answer: D\n",
        "\n3.\nModel response: ' at 1 (there's a closed circle at y = 1), the range in interval notation is "
        "\\((-4, 1]\\).\n\nFinal values:\nDomain: \\((-3, 3]\\)\nRange: \\((-4, 1]\\)'\n"
        "Extracted Answer: Domain: \\((-3, 3]\\)\nRange: \\((-4, 1]\\)\n",
        "\n4.\nModel response: 'As it stands, I cannot provide the correct option letter because there isn't "
        "enough information to solve for 'y'.'\nExtracted Answer: null\n",
        "\n5.\nModel response: 'Given that AB = 17.6 meters, we can now substitute into the equation:\n\n"
        "d = 17.6 / cos(38\u00b0)\n\nTherefore, to one decimal place, the distance d between Ned and Bart is "
        "approximately 22.3 meters.'\nExtracted answer: 22.3\n",
        "\n6.\nModel response:  have all the coefficients for the quadratic function:\n\\( f(x) = ax^2 + bx + c "
        "\\)\n\\( f(x) = -1x^2 - 2x + 1 \\)\n\nTherefore, the equation for the graphed function \\( f \\) is:"
        "\n\\( f(x) = -x^2 - 2x + 1 \\)\"'\nExtracted answer: f(x) = -x^2 - 2x + 1\n",
    ]
    demo = task + "".join(e + "\n\n" for e in examples)
    return f"{demo}7.\nModel response: '{prediction}'\nExtracted Answer: "


def mathverse_score_prompt(question_for_eval: str, answer: str, extract: str) -> str:
    """utils/mathverse.py build_mathverse_gpt4_score_prompt (text reproduced exactly)."""
    task = ("\nBelow are two answers to a math question. Question is [Question], [Standard Answer] is the standard "
            "answer to the question, and [Model_answer] is the answer extracted from a model's output to this "
            "question.  Determine whether these two answers are consistent.\nPlease note that only when the "
            "[Model_answer] completely matches the [Standard Answer] means they are consistent. For "
            "non-multiple-choice questions, if the meaning is expressed in the same way, it is also considered "
            "consistent, for example, 0.5m and 50cm.\nIf they are consistent, Judement is 1; if they are different, "
            "Judement is 0.\n\n\n")
    choices = "\nChoices:\nA:2\nB:2\u221a{{3}}\nC:\u221a{{3}}\nD:2\u221a{{2}}"
    circle = "As shown in the figure, circle O has a radius 1.0, if angle BAC = 60.0, then the length of BC is ()"
    examples = [
        "\n[Question]: Write the set of numbers represented on the number line in interval notation.\n"
        "[Standard Answer]: (-2,1]\n[Model_answer] : Extracted Answer: \\((-2, 1)\\)\nJudgement: 0\n",
        f"\n[Question]: {circle}{choices}\n[Standard Answer]: C\n[Model_answer] : B:2\u221a{{{{3}}}}\nJudgement: 0\n",
        "\n[Question]: Find the domain and range of the function f using interval notation.\n"
        "[Standard Answer]: domain: [-4, 0) and range: (-3, 1]\n[Model_answer] : Range: \\((-4, 1]\\)\n"
        "Judgement: 0\n",
        f"\n[Question]: {circle}{choices}\n[Standard Answer]: C\n[Model_answer] : null\nJudgement: 0\n",
    ]
    demo = task + "".join(e + "\n\n" for e in examples)
    test = (f"\n    [Question]: {question_for_eval}\n    [Standard Answer]: {answer}\n"
            f"    [Model_answer] : {extract}\n    Judgement:")
    return demo + test


def mathverse_post_check_score(answer, extract) -> bool:
    """utils/mathverse.py post_check_score: the extracted answer equals the gold one (stripped)."""
    return str(extract).strip() == str(answer).strip()


# --------------------------------------------------------------------------- dataset/dynamath.py

DYNAMATH_SYSTEM = ("You are a helpful assistant that helps me to format free-form answers into a short answer "
                   "according to the instruction.\n")


def dynamath_preprocess(text) -> str:
    """dynamath.py preprocess: the span from the first '{' to the last '}' if any, backslashes removed."""
    text = str(text)
    if 0 <= text.find("{") < text.rfind("}"):
        text = text[text.find("{"): text.rfind("}") + 1]
    return text.replace("\\", "").replace("\\n", "\n")


def _transfer(text: str) -> float:
    if "\u03c0" in text:
        return float(text.split("\u03c0")[0]) * math.pi
    return float(text)


def dynamath_parse(answer, answer_type: str):
    """dynamath.py parse_answer -> (succeeded, short answer). Raises TypeError/AttributeError
    for a non-string answer, as VLMEvalKit does (its caller then falls back)."""
    if answer_type == "float":
        if answer.isdigit():
            return True, float(answer)
        try:
            return True, _transfer(answer.split(' ')[0])
        except (ValueError, IndexError):
            return False, None
    if answer_type == "multiple choice":
        if len(answer) == 1:
            return True, answer.upper()
        found = [ch for ch in 'ABCDE' if ch in answer.upper()]
        return (True, found[0]) if len(found) == 1 else (False, None)
    return True, answer


def dynamath_json_answer(pred: str, answer_type: str):
    """The first step of dynamath.py DynaMath_auxeval: the JSON's "short answer", parsed;
    None when any part fails (VLMEvalKit's except branch)."""
    try:
        obj = json.loads(pred, strict=False)
        short = obj.get("short answer")
        if short is None:
            return None
        ok, value = dynamath_parse(short, answer_type)
        return value if ok else None
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None


def dynamath_prompt(pred: str, answer_type: str) -> str:
    """dynamath.py DynaMath_auxeval's judge prompt (text reproduced exactly; system DYNAMATH_SYSTEM)."""
    if answer_type == 'multiple choice':
        inst = "Output the corresponing choice option, such as 'A', 'B', 'C', 'D', in a single line."
    elif answer_type == 'float':
        inst = "Output a three-digit floating-point number in a single line."
    else:
        inst = ("Output a short answer in a single line. Any float numbers in the answer "
                "should be formatted as three-digit floating-point numbers.")
    return f"Free-form answer: {pred}\nInstruction: {inst}"


def dynamath_verdict(answer: str, answer_type: str, pred: str, succeeded: bool, short) -> bool:
    """The end of dynamath.py DynaMath_auxeval: is the (parsed or not) answer right."""
    if answer_type == 'float':
        return succeeded and abs(float(short) - float(answer)) <= 0.001
    if answer_type == 'multiple choice':
        return short == answer if succeeded else answer in pred[:3].upper()
    return str(short).lower() in answer.lower()
