"""How a benchmark item is asked and which part of the output VLMEvalKit scores: the protocols.

- `vlmevalkit`: VLMEvalKit's own dataset prompts (the dataset class's build_prompt: image_mcq.py,
  image_vqa.py, image_yorn.py, dynamath.py) and the whole output as the prediction: what
  VLMEvalKit sends a model whose wrapper has no custom prompt for the dataset. In its config
  (vlmeval/config.py) that includes Qwen2.5-VL and Qwen3-VL (built with use_custom_prompt=False),
  not Qwen2-VL (next item).
- `qwen2vl`: what VLMEvalKit sends Qwen2-VL: its config builds Qwen2-VL-2B/7B/72B-Instruct as
  Qwen2VLChat with use_custom_prompt left True, so inference.py asks with the model's prompt
  mixin (vlm/qwen2_vl/prompt.py Qwen2VLPromptMixin) wherever use_custom_prompt(dataset) holds:
  MMStar the stripped MCQ prompt ("A. ..." options, "Please select the correct answer from the
  options above." or its Chinese form, no trailing space or newline); HallusionBench the
  question + " Please answer yes or no."; the VQA datasets (MathVista, MathVision, MathVerse,
  ChartQA, DynaMath) the question + "\nPlease try to answer the question with short words or
  phrases if possible." (DynaMath without its JSON guide); MME the dataset's prompt (the mixin
  leaves MME to it). The whole output is the prediction (post_process=False, the default).
  These prompts are behind VLMEvalKit's Qwen2-VL numbers.
- `paper`: the R1-VL authors' VLMEvalKit wrapper (github jingyi0000/R1-VL, eval/qwen2_vl/
  prompt.py and model.py), which produced the paper's Table 1: their older Qwen2VLPromptMixin's
  prompts (MCQ choices "A: ...", HallusionBench asked as "Choices: A: Yes / B: No", VQA datasets
  the bare question), wrapped in their REASONING_PROMPT; the prediction is everything after
  "The final answer is:" when the output has exactly one such marker, and for HallusionBench
  a letter is mapped back to Yes/No by their rule ('a' anywhere -> Yes, else 'b' -> No;
  --fix paper-hallusion reads a standalone letter instead).

The item's cells are those VLMEvalKit's pandas reading gives (r1vl.eval.tsv: "None", "NA", ...
cells missing, numbers as pandas types them), so an MMStar option or hint reading "None" is not
asked; --fix na-text keeps them. Each protocol's text equals, byte for byte, what VLMEvalKit's
own classes build from the same row (tests/r1vl/eval/test_eval_questions.py, case files made by
tests/r1vl/eval/cases/make_questions.py from VLMEvalKit's source at a recorded commit).

The default (`auto`) is `paper` for R1-VL checkpoints (r1vl's own: a trainer_state.json in
it or a results.json beside it, as train.py writes; or a directory named R1-VL*) and
`vlmevalkit` otherwise (and with --score-only, unless the run's eval_config.json says); the report names the protocol of every number.
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path

from r1vl.eval.tsv import Item

# The protocols a question is asked under; `auto` picks one of them (resolve).
CONCRETE = ("paper", "vlmevalkit", "qwen2vl")
PROTOCOLS = ("auto", *CONCRETE)

# eval/qwen2_vl/model.py REASONING_PROMPT of the R1-VL authors' wrapper (sent identically: an interface).
REASONING_PROMPT = """Generate an image description based on the question.
Then, provide a rationale to analyze the question.
Next, generate a step-by-step reasoning process to solve the problem. Ensure the steps are logical and concise.
Finally, provide a concise summary of the final answer in the following format: 'The final answer is: xxx.

Format your response with the following sections, separated by ###:
### Image Description:
### Rationales:
### Let's think step by step.
### Step 1:
### Step 2:
...
### The final answer is: 

{question}"""

_MARKER = "The final answer is:"
_AB = "\nChoices:\nA: Yes\nB: No"

# dataset/dynamath.py Dynamath.GUIDE / TEXT_EXAMPLE (VLMEvalKit's DynaMath prompt; an interface).
_DYNAMATH_GUIDE = (
    "\n## Answer Instruction Please provide an answer to the question outlined above. Your response should adhere "
    "to the following JSON format, which includes two keys: 'solution' and 'short answer'. The 'solution' key can "
    "contain detailed steps needed to solve the question, and the 'short answer' key should provide a concise "
    "response. {INST}\n\nExample of expected JSON response format:\n\n")
_DYNAMATH_EXAMPLE = json.dumps({"solution": "[Detailed step-by-step explanation]",
                                "short answer": "[Concise Answer]"}, indent=4)


# vlm/qwen2_vl/prompt.py Qwen2VLPromptMixin's texts (an interface: sent byte for byte).
_MCQ_EN = "Please select the correct answer from the options above."
_MCQ_CN = "请直接回答选项字母。"
_YORN_SUFFIX = " Please answer yes or no."
_VQA_SUFFIX = "\nPlease try to answer the question with short words or phrases if possible."
_CJK = re.compile("[\u4e00-\u9fff]")  # the mixin's cn_string


def resolve(protocol: str, model: str | None) -> str:
    """`auto` -> `paper` for an R1-VL checkpoint, else `vlmevalkit`."""
    if protocol != "auto":
        return protocol
    if model is None:
        return "vlmevalkit"
    path = Path(model)
    name = path.resolve().name.lower().replace("_", "-") if path.exists() else path.name.lower()
    # r1vl's own checkpoints: a trainer checkpoint, or train.py's RUN/final beside its results.json
    r1vl_run = (path / "trainer_state.json").is_file() or (path.parent / "results.json").is_file()
    return "paper" if "r1-vl" in name or "r1vl" in name or r1vl_run else "vlmevalkit"


def _options(item: Item) -> dict[str, str]:
    return {c: item.fields[c] for c in string.ascii_uppercase if item.fields.get(c, "") != ""}


def _hint(item: Item) -> str:
    hint = item.fields.get("hint", "")
    return f"Hint: {hint}\n" if hint != "" else ""


def vlmevalkit_question(bench: str, item: Item) -> str:
    """The text VLMEvalKit's dataset class builds (image_mcq.py, image_vqa.py, image_yorn.py, dynamath.py)."""
    q = item.fields["question"]
    if bench == "MMStar":
        options = _options(item)
        text = _hint(item) + f"Question: {q}\n"
        if options:
            text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
            text += "Please select the correct answer from the options above. \n"
        return text
    if bench == "ChartQA":
        return q + "\nAnswer the question using a single word or phrase."
    if bench == "DynaMath":
        kind = item.fields["answer_type"]
        if kind == "multiple choice":
            inst = "Provide the corresponing choice option in the 'short answer' key, such as 'A', 'B', 'C', or 'D'."
        elif kind == "float":
            inst = "Format the answer as a three-digit floating-point number and provide it in the 'short answer' key."
        else:
            inst = "Float numbers in the answer should be formatted as three-digit floating-point numbers."
        return f"## Question\n {q}" + _DYNAMATH_GUIDE.format(INST=inst) + _DYNAMATH_EXAMPLE
    return q


def qwen2vl_question(bench: str, item: Item) -> str:
    """The text VLMEvalKit's Qwen2VLChat sends (module docstring): its prompt mixin where
    use_custom_prompt(dataset) holds (MCQ, HallusionBench, VQA), else the dataset's (MME)."""
    q = item.fields["question"]
    if bench == "MMStar":  # _build_mcq_prompt
        options = _options(item)
        text = _hint(item) + f"Question: {q}\n"
        if options:
            text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
            text += _MCQ_CN if _CJK.search(text) else _MCQ_EN
        return text.rstrip()
    if bench == "HallusionBench":  # _build_yorn_prompt; MME is a Y/N dataset the mixin leaves out
        return q + _YORN_SUFFIX
    if bench == "MME":
        return vlmevalkit_question(bench, item)
    return q + _VQA_SUFFIX  # _build_vqa_prompt: every other benchmark is a VQA dataset


def paper_question(bench: str, item: Item) -> str:
    """The R1-VL wrapper's text: Qwen2VLPromptMixin's prompt, then REASONING_PROMPT around it."""
    q = item.fields["question"]
    if bench == "MMStar":  # _build_mcq_prompt
        options = _options(item)
        text = _hint(item) + f"Question: {q}\n"
        if options:
            text += "Choices:\n" + "".join(f"{k}: {v}\n" for k, v in options.items())
            text += _MCQ_CN if _CJK.search(text) else "Please select the correct answer from the choices above."
        text = text.rstrip()
    elif bench == "HallusionBench":  # _build_yorn_prompt
        if "Please answer yes or no" not in q:
            text = q + _AB
        elif "Please answer yes or no." in q:
            text = q.replace("Please answer yes or no.", _AB)
        elif "Please answer Yes or No." in q:
            text = q.replace("Please answer Yes or No.", _AB)
        elif "Yes or No" in q:
            text = q.replace("Yes or No", _AB)
        elif "yes or no" in q:
            text = q.replace("yes or no", _AB)
        else:
            text = q
    else:  # MME: the dataset's prompt; VQA datasets: _build_vqa_prompt, the bare question
        text = q
    if "Question: " not in text:
        text = "Question: " + text
    return REASONING_PROMPT.format(question=text)


_QUESTION = {"paper": paper_question, "vlmevalkit": vlmevalkit_question, "qwen2vl": qwen2vl_question}


def question(bench: str, item: Item, protocol: str) -> str:
    """The user turn's text for `item` of benchmark `bench` under a protocol of CONCRETE
    (R1VL, the trainer's own data, is asked its bare question under every protocol)."""
    if bench == "R1VL":
        return item.fields["question"]
    return _QUESTION[protocol](bench, item)


_LETTER = re.compile(r"\b([AB])\b")


def prediction(bench: str, output: str, protocol: str, fixes: frozenset = frozenset()) -> str:
    """What VLMEvalKit receives as `prediction` for this model output under `protocol`
    (the paper's: eval/qwen2_vl/model.py generate_inner's post-processing)."""
    if protocol != "paper" or bench == "R1VL":
        return output
    parts = output.split(_MARKER)
    if len(parts) != 2:
        return output
    answer = parts[-1].strip()
    if bench == "HallusionBench":
        if "paper-hallusion" in fixes:
            m = _LETTER.search(answer.upper())
            return {"A": "Yes", "B": "No"}[m.group(1)] if m else answer
        if "a" in answer.lower():
            return "Yes"
        if "b" in answer.lower():
            return "No"
    return answer
