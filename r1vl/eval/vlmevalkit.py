"""VLMEvalKit's scoring rules, re-implemented rule for rule (read, not copied or imported).

Every function names the VLMEvalKit function it reproduces (paths under vlmeval/ in
open-compass/VLMEvalKit). Where VLMEvalKit runs Python's eval() on a cell or on a model's
output, this module parses literals with ast.literal_eval and evaluates arithmetic with a
small AST walker instead: the same value for every numeric literal and arithmetic
expression, and never code. The judge prompts are interfaces, not prose: they must reach
the judge byte for byte as VLMEvalKit sends them, so their text is reproduced exactly,
in-context examples included (the typo "Model respone" too).

Known VLMEvalKit bugs are kept by default (numbers stay comparable with its leaderboard);
each has a named fix (FIXES) that r1vl.eval applies only when asked (--fix NAME).
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import string

# Named corrections of VLMEvalKit's known bugs (python -m r1vl.eval --fix NAME).
FIXES = {
    "mathvista-text": "MathVista: text and list answers compare the extracted answer with the gold one "
                      "(VLMEvalKit's post_check compares str(None), so they are never right)",
    "prefetch-zero": "MathVista/MathVision: a right prefetched answer that is falsy (the integer 0) is "
                     "kept (VLMEvalKit tests the prefetch's truth and sends it to the judge)",
    "punctuation": "process_punctuation strips every stray period (VLMEvalKit passes re.UNICODE as "
                   "the count, so only the first 32 go)",
    "paper-hallusion": "paper protocol: HallusionBench maps a standalone A/B letter, not any 'a'/'b' "
                       "character of the answer (the authors' wrapper maps 'The answer is B' to Yes)",
}

JUDGE_FAILED = "Failed to obtain answer via API."  # VLMEvalKit's FAIL_MSG

# --------------------------------------------------------------------------- vlmeval/smp/misc.py

_PUNCT = [';', r'/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!']
_COMMA_STRIP = re.compile(r'(\d)(,)(\d)')
_PERIOD_STRIP = re.compile(r'(?<!\d)\.(?!\d)')


def process_punctuation(text: str, fix: bool = False) -> str:
    """smp/misc.py process_punctuation: each mark is deleted when it touches a space somewhere
    in the text (or the text has a digit,digit comma), else replaced by a space; periods not
    between digits are deleted, at most 32 of them (re.UNICODE passed as `count`)."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + ' ' in text or ' ' + p in text) or digit_comma:
            out = out.replace(p, '')
        else:
            out = out.replace(p, ' ')
    return _PERIOD_STRIP.sub('', out, count=0 if fix else int(re.UNICODE))


# --------------------------------------------------------------------------- dataset/utils/yorn.py

def yorn_extraction(output: str, fix_punctuation: bool = False) -> str:
    """utils/yorn.py YOrN_Extraction: 'Yes' / 'No' when exactly one of the words occurs, else 'Unknown'."""
    words = process_punctuation(output.lower(), fix_punctuation).split()
    if 'yes' in words and 'no' not in words:
        return 'Yes'
    if 'yes' not in words and 'no' in words:
        return 'No'
    return 'Unknown'


def yorn_prompt(question: str, prediction: str) -> str:
    """utils/yorn.py YOrN_match_prompt (text reproduced exactly: a judge interface)."""
    tmpl = (
        'You are an AI assistant who will help me to match an answer with two options of a question. '
        'The options are only Yes / No. '
        'You are provided with a question and an answer, '
        'and you need to find which option (Yes / No) is most similar to the answer. '
        'If the meaning of all options are significantly different from the answer, output Unknown. '
        'Your should output a single word among the following 3 choices: Yes, No, Unknown.\n'
        'Example 1: \n'
        "Question: Is the word in this image 'Hello'?\nAnswer: The word in this image is 'Hello'.\nYour output: Yes\n"
        'Example 2: \n'
        "Question: Is the word in this image 'Hello'?\n"
        "Answer: The word in this image is not 'Hello'.\nYour output: No\n"
        'Example 3: \n'
        'Question: {}?\nAnswer: {}\nYour output: '
    )
    return tmpl.format(question, prediction)


# --------------------------------------------------------------------------- utils/matching_util.py

_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", 'Cannot determine the answer')
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: dict) -> str | bool:
    """utils/matching_util.py can_infer_option: the one option letter standing alone among the
    last four words (after '.()[],:;!*#{}' become spaces); 'Z' for a refusal or a lone Z;
    then "answer is X" (A-D only); else False."""
    if JUDGE_FAILED in answer:
        return False
    for refusal in _REFUSALS:
        if refusal in answer:
            return 'Z'
    mod = answer
    for c in '.()[],:;!*#{}':
        mod = mod.replace(c, ' ')
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and sum(1 for c in ('Z', '') if c in splits) == 1:
        return 'Z'
    m = _VERBOSE_ANSWER.search(answer or "")
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return False


def can_infer_text(answer: str, choices: dict) -> str | bool:
    """utils/matching_util.py can_infer_text: the one option whose text (lowercased) the answer
    contains, unless the answer is over twice as long as all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else False


def can_infer(answer, choices: dict) -> str | bool:
    """utils/matching_util.py can_infer: by letter, else by option text."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


# --------------------------------------------------------------------------- utils/multiple_choice.py

def option_str(choices: dict) -> str:
    """smp/vlm.py build_option_str."""
    return 'There are several options: \n' + ''.join(f'{c}. {v}\n' for c, v in choices.items())


def mcq_prompt(question: str, options: str, prediction: str) -> str:
    """utils/multiple_choice.py build_prompt (English; text reproduced exactly)."""
    tmpl = (
        'You are an AI assistant who will help me to match '
        'an answer with several options of a single-choice question. '
        'You are provided with a question, several options, and an answer, '
        'and you need to find which option is most similar to the answer. '
        'If the meaning of all options are significantly different from the answer, output Z. '
        'Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n'
        'Example 1: \n'
        'Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n'
        'Answer: a cute teddy bear\nYour output: A\n'
        'Example 2: \n'
        'Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n'
        'Answer: Spider\nYour output: Z\n'
        'Example 3: \n'
        'Question: {}?\nOptions: {}\nAnswer: {}\nYour output: '
    )
    return tmpl.format(question, options, prediction)


def mcq_prompt_cn(question: str, options: str, prediction: str) -> str:
    """utils/multiple_choice.py build_prompt_cn (questions with CJK characters)."""
    tmpl = (
        '你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。'
        '你会被提供：一个问题，多个选项，一个答案。你的任务是找到与答案意义最相近的选项。'
        '如果所有选项的意义都与答案显著不同，则输出 Z。'
        '你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。'
        '例 1:'
        '问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 一只可爱的泰迪熊\n输出: A\n'
        '例 2: \n'
        '问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 蜘蛛\n输出: Z\n'
        '例 3: \n'
        '问题: {}?\n选项: {}\n答案: {}\n输出: '
    )
    return tmpl.format(question, options, prediction)


def cn_string(text: str) -> bool:
    """smp/misc.py cn_string."""
    return re.search('[\u4e00-\u9fff]', text) is not None


# --------------------------------------------------------------------------- utils/vqa_eval.py

def relaxed_correctness(target, prediction, max_relative_change: float = 0.05) -> bool:
    """utils/vqa_eval.py relaxed_correctness: within 5% of a numeric, non-zero target (a trailing
    '%' divides that side by 100); otherwise the same string ignoring case."""

    def to_float(text: str) -> float | None:
        try:
            return float(text.rstrip('%')) / 100.0 if text.endswith('%') else float(text)
        except ValueError:
            return None

    prediction, target = str(prediction), str(target)
    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def chartqa_answers(answer: str) -> list:
    """utils/vqa_eval.py process_line: a list literal is several accepted answers
    (istype(answer, list) evals the cell), anything else one answer."""
    value = literal(answer)
    return value if isinstance(value, list) else [answer]


def chartqa_hit(answer: str, prediction: str) -> bool:
    """process_line(method='relaxed_accuracy') + hit_calculate (the max over accepted answers)."""
    pred = prediction.strip()
    return any(relaxed_correctness(x, pred) for x in chartqa_answers(answer))


# --------------------------------------------------------------------------- safe stand-ins for eval()

_MISSING = object()


def literal(text) -> object:
    """ast.literal_eval(text), or _MISSING when it is no literal (where VLMEvalKit's eval fails)."""
    try:
        return ast.literal_eval(str(text).strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _MISSING


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def arithmetic(text: str):
    """The value of a Python arithmetic expression over number literals (what eval() gives for
    such text); raises ValueError for anything else, and for powers too large to be worth it."""
    if len(text) > 1000:
        raise ValueError("too long")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, MemoryError, RecursionError, ValueError):
        raise ValueError("not an expression") from None

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, complex, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            return _UNOPS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 4096:
                raise ValueError("power too large")
            return _BINOPS[type(node.op)](left, right)
        raise ValueError("not arithmetic")

    try:
        return walk(tree.body)
    except (ArithmeticError, TypeError):
        raise ValueError("no value") from None


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
            if choices is _MISSING:
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
    if choices is _MISSING:
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


MCQ_LETTERS = string.ascii_uppercase
