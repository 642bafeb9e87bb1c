"""VLMEvalKit's scoring rules, re-implemented rule for rule (read, not copied or imported).

Every function names the VLMEvalKit function it reproduces (paths under vlmeval/ in
open-compass/VLMEvalKit). Where VLMEvalKit runs Python's eval() on a cell or on a model's
output, this module parses literals with ast.literal_eval and evaluates arithmetic with a
small AST walker instead: the same value for every numeric literal and arithmetic
expression, and never code. The judge prompts are interfaces, not prose: they must reach
the judge byte for byte as VLMEvalKit sends them, so their text is reproduced exactly,
in-context examples included (the typo "Model respone" too).

The math benchmarks' rules and judge prompts (MathVista, MathVision, MathVerse, DynaMath) are
in r1vl.eval.vlmevalkit_math.

Known VLMEvalKit bugs are kept by default (numbers stay comparable with its leaderboard);
each has a named fix (FIXES) that r1vl.eval applies only when asked (--fix NAME).
"""
from __future__ import annotations

import ast
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
    "na-text": "benchmark cells reading None, NA, nan, NULL, N/A, ... (pandas' default NA strings) stay text "
               "(VLMEvalKit's pandas.read_csv reads them as missing: MMStar options and hints reading 'None' "
               "are not asked)",
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

MISSING = object()


def literal(text) -> object:
    """ast.literal_eval(text), or MISSING when it is no literal (where VLMEvalKit's eval fails)."""
    try:
        return ast.literal_eval(str(text).strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return MISSING


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


MCQ_LETTERS = string.ascii_uppercase
