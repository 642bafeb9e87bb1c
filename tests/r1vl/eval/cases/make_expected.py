"""Write the conformance case files (<Benchmark>.tsv, <Benchmark>.expected.json) of this folder,
their verdicts and metrics computed by VLMEvalKit's own functions, and the judge prompts
(prompts/*.txt) from VLMEvalKit's own prompt builders.

    python tests/r1vl/eval/cases/make_expected.py VLMEVALKIT [--commit SHA]

VLMEVALKIT is a checkout of github.com/open-compass/VLMEvalKit, or its bare git directory (then
its HEAD is read). Nothing of it is installed or imported as a package: the source files named
in SOURCES are copied to a scratch directory and loaded as modules, with their heavy imports
(vlmeval.smp, the judge builders, timeout_decorator, the dataset base class) replaced by stubs
that hold VLMEvalKit's own pure helpers (taken out of smp/misc.py, smp/vlm.py by name) and its
load() of a TSV (pandas.read_csv(sep='\\t')). Needs pandas, numpy, latex2sympy2_extended; run
by hand when the cases change, never by the tests (which read the files written here).

The flow reproduced for each benchmark is its evaluate(): the benchmark TSV read with pandas
and cleaned as ImageBaseDataset.__init__ does (skip_noimg, image references, index str/int),
a `prediction` column added (the eval file; kept in memory, as VLMEvalKit's default xlsx round
trip keeps each column's type), then the per-row function and the rating function named in
each expected file. Items VLMEvalKit sends to its judge are found with a judge that records
being asked and answers FAIL_MSG (a judge that always fails): verdict "judge", and the metrics
are those VLMEvalKit reports when every judge call fails (for MMStar, exact_matching: model=None).
"""
from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: the TSV helpers of tests/r1vl/eval
from evalkit_files import png_b64, write_tsv  # noqa: E402

SOURCES = ["vlmeval/smp/misc.py", "vlmeval/smp/vlm.py", "vlmeval/utils/matching_util.py",
           "vlmeval/dataset/utils/yorn.py", "vlmeval/dataset/utils/multiple_choice.py",
           "vlmeval/dataset/utils/vqa_eval.py", "vlmeval/dataset/utils/mathvista.py",
           "vlmeval/dataset/utils/mathv.py", "vlmeval/dataset/utils/mathverse.py", "vlmeval/dataset/dynamath.py"]
FAIL_MSG = "Failed to obtain answer via API."


# --------------------------------------------------------------------------- VLMEvalKit, loaded

def copy_sources(root: Path, scratch: Path) -> str:
    bare = not (root / "vlmeval").is_dir()
    for rel in SOURCES:
        text = (subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{rel}"], check=True,
                               capture_output=True, text=True).stdout if bare else (root / rel).read_text())
        (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        (scratch / rel).write_text(text)
    if bare:
        return subprocess.run(["git", "--git-dir", str(root), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def pull(path: Path, names: list[str], namespace: dict) -> dict:
    """The top-level functions `names` of a source file, defined in `namespace`."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in body} == set(names), (path, names)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so that submodules load
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def vlmevalkit(scratch: Path) -> dict:
    import logging
    import re

    import numpy as np
    import pandas as pd

    def load(f, fmt=None):  # smp/file.py load, for the formats used here
        if str(f).endswith(".tsv"):
            return pd.read_csv(f, sep="\t")
        import pickle
        return pickle.load(open(f, "rb"))

    def dump(data, f, **kwargs):  # smp/file.py dump
        if str(f).endswith(".tsv"):
            data.to_csv(f, sep="\t", index=False, encoding="utf-8", quoting=csv.QUOTE_ALL)
        else:
            import pickle
            pickle.dump(data, open(f, "wb"))

    ns = pull(scratch / "vlmeval/smp/misc.py", ["process_punctuation", "istype", "listinstr", "d2df", "cn_string",
                                               "toliststr"], {"pd": pd, "re": re})
    pull(scratch / "vlmeval/smp/vlm.py", ["build_option_str"], ns)
    smp = module("vlmeval.smp", load=load, dump=dump, get_logger=logging.getLogger,
                 get_intermediate_file_path=lambda f, suffix, ext=None: str(f).rsplit(".", 1)[0] + suffix + "."
                 + (ext or str(f).rsplit(".", 1)[1]), get_pred_file_format=lambda: "tsv", timestr=lambda *a: "0",
                 **{k: ns[k] for k in ("process_punctuation", "istype", "listinstr", "d2df", "cn_string", "toliststr",
                                       "build_option_str")})
    module("vlmeval")
    module("vlmeval.smp.file", load=load, dump=dump)
    module("vlmeval.smp.log", get_logger=logging.getLogger)
    module("vlmeval.smp.vlm", build_option_str=ns["build_option_str"])
    smp.file = sys.modules["vlmeval.smp.file"]
    module("timeout_decorator", timeout=lambda *a, **k: (lambda f: f))
    matching = load_file("vlmeval.utils.matching_util", scratch / "vlmeval/utils/matching_util.py")

    def track_progress_rich(func, tasks, nproc=1, save=None, keys=None, **kw):  # utils/mp_util.py, sequential
        return [func(**t) if isinstance(t, dict) else func(*t) for t in tasks]

    module("vlmeval.utils", can_infer=matching.can_infer, can_infer_lego=matching.can_infer_lego,
           track_progress_rich=track_progress_rich)
    module("vlmeval.dataset")
    module("vlmeval.dataset.image_base", ImageBaseDataset=type("ImageBaseDataset", (), {}))
    module("vlmeval.dataset.utils", build_judge=None)
    mods = {"np": np, "pd": pd, "load": load, "dump": dump, "matching": matching, "smp": smp}
    for rel in SOURCES[3:]:
        name = rel[:-3].replace("/", ".")
        mods[name.rsplit(".", 1)[1]] = load_file(name, scratch / rel)
    return mods


class Judge:
    """A judge that always fails (VLMEvalKit's FAIL_MSG) and records the prompts it was sent."""

    def __init__(self):
        self.prompts: list[str] = []
        self.system_prompt = None

    def generate(self, prompt, **kwargs):
        self.prompts.append(prompt)
        return FAIL_MSG


def stub_reply(prompt: str) -> str:
    """What the stub judge answers, here and in test_eval_cases.py: 'No' to a Yes/No match, '1' to
    MathVerse's scoring, 'C' to anything else (one reply each: readable by every rule)."""
    if "Yes / No" in prompt:
        return "No"
    return "1" if prompt.endswith("Judgement:") else "C"


class StubJudge(Judge):
    """A judge that answers stub_reply and records the prompts."""

    def generate(self, prompt, **kwargs):
        self.prompts.append(prompt)
        return stub_reply(prompt)


PROMPT_HEADER = ("# The prompt VLMEvalKit's {source} sends its judge for item {index} of {name}.tsv (prediction\n"
                 "# {prediction!r}), the judge answering as stub_reply; written by make_expected.py from\n"
                 "# VLMEvalKit {commit}. The prompt is everything after the next line, byte for byte.\n"
                 "# ---8<---\n")


def judge_prompts(vk, name: str, data, preds) -> list[tuple[str, list[str]]]:
    """(index, the prompts VLMEvalKit sends the stub judge, in order) for the items it asks about."""
    data = data.copy()
    data["prediction"] = [str(preds[str(i)]) for i in data["index"]]
    out = []
    for i in range(len(data)):
        line, judge = data.iloc[i].copy(), StubJudge()
        if name in ("MME", "HallusionBench"):
            if vk["yorn"].YOrN_Extraction(line["prediction"]) == "Unknown":
                vk["yorn"].YOrN_auxeval(judge, line)
        elif name.startswith("MMStar"):
            vk["multiple_choice"].extract_answer_from_item(judge, line)
        elif name == "MathVista":
            vk["mathvista"].MathVista_auxeval(judge, line)
        elif name == "MathVision":
            vk["mathv"].MATH_V_auxeval(judge, line)
        elif name == "MathVerse":
            line["extract"] = vk["mathverse"].MathVerse_auxeval_extract(judge, line)["extract"]
            vk["mathverse"].MathVerse_auxeval_score(judge, line)
        elif name == "DynaMath":
            vk["dynamath"].DynaMath_auxeval(judge, line)
        if judge.prompts:
            out.append((str(line["index"]), judge.prompts))
    return out


PROMPT_SOURCES = {"MME": "utils/yorn.py YOrN_match_prompt", "HallusionBench": "utils/yorn.py YOrN_match_prompt",
                  "MMStar": "utils/multiple_choice.py build_prompt (extract_answer_from_item)",
                  "MathVista": "utils/mathvista.py build_mathvista_gpt4_prompt",
                  "MathVision": "utils/mathv.py build_mathv_gpt4_prompt",
                  "MathVerse": "utils/mathverse.py build_mathverse_gpt4_extract_prompt, then "
                               "build_mathverse_gpt4_score_prompt",
                  "DynaMath": "dynamath.py DynaMath_auxeval"}


def dataset_frame(vk: dict, tsv: Path):
    """vlmeval/dataset/image_base.py ImageBaseDataset.__init__ on a benchmark TSV (skip_noimg=True)."""
    pd, np = vk["pd"], vk["np"]
    data = vk["load"](str(tsv))
    no_image = [str(x) for x in data[pd.isna(data["image"])]["index"]]
    data = data[~pd.isna(data["image"])]
    data["index"] = [str(x) for x in data["index"]]
    data["image"] = [str(x) if not pd.isna(x) else "" for x in data["image"]]
    image_map = {x: y for x, y in zip(data["index"], data["image"])}
    for k in image_map:
        if 0 < len(image_map[k]) <= 64:
            assert image_map[k] in image_map and len(image_map[image_map[k]]) > 64
            image_map[k] = image_map[image_map[k]]
    data["image"] = [image_map[k] for k in data["index"]]
    if np.all([vk["smp"].istype(x, int) for x in data["index"]]):
        data["index"] = [int(x) for x in data["index"]]
    return data.drop(columns=["image"]).reset_index(drop=True), no_image


# --------------------------------------------------------------------------- cases

def case_image(i: int) -> str:
    """Case i's image: 2 x 2 pixels of a colour of its own, base64 PNG."""
    return png_b64(((37 * i) % 256, 90, 160), (2, 2))


def yorn_cases():
    # (prediction, the side of utils/yorn.py YOrN_Extraction it stands on)
    return [("Yes", "the word yes alone"), ("No.", "no, a period stripped"), ("yes-ish", "'-' becomes a space"),
            ("(yes)", "parentheses stripped"), ("Yes, no doubt", "both words: Unknown, to the judge"),
            ("maybe", "neither word: Unknown, to the judge"), ("Nope", "'nope' is not 'no'"),
            ("The answer is no", "no among other words"), ("YES", "upper case lowered"),
            ("I think so, yes.", "yes with a trailing period")]


def mme_rows():
    cats = ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters", "scene",
            "code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]
    preds = yorn_cases()
    rows, items, n = [], [], 0
    for c_no, cat in enumerate(cats):
        for img in range(2 if cat in ("count", "code_reasoning") else 1):
            first = str(n + 1)
            for q, answer in enumerate(("Yes", "No")):
                n += 1
                pred, rule = preds[(n * 3 + c_no) % len(preds)]
                rows.append({"index": str(n), "image": case_image(n) if q == 0 else first,
                             "question": f"Is this a {cat} picture {img}? Please answer yes or no.",
                             "answer": answer, "category": cat, "image_path": f"{cat}/{img}.jpg"})
                items.append((str(n), pred, rule))
    return rows, items


def hallusion_rows():
    spec = [  # (set, figure, question, answer, category, l2-category, prediction index or None: empty image)
        ("0", "0", "0", "Yes", "VS", "chart", 0), ("0", "0", "1", "No", "VS", "chart", 1),
        ("0", "1", "0", "No", "VS", "chart", 3), ("0", "1", "1", "Yes", "VS", "chart", 2),
        ("1", "0", "0", "Yes", "VD", "map", 6), ("1", "1", "0", "No", "VD", "map", 7),
        ("1", "1", "1", "No", "VD", "map", None), ("2", "0", "0", "No", "VD", "figure", 4),
        ("2", "0", "1", "Yes", "VD", "figure", 8), ("2", "1", "0", "No", "VS", "figure", 5),
    ]
    preds = yorn_cases()
    rows, items = [], []
    for i, (s, f, q, answer, cat, l2, p) in enumerate(spec):
        index = f"{cat}_{l2}_{i}_{s}_{f}_{q}"
        rows.append({"index": index, "image": "" if p is None else case_image(i), "category": cat, "subcategory": l2,
                     "l2-category": l2, "question": f"Is the value in figure {f} of set {s} above {q}?",
                     "answer": answer})
        if p is not None:
            items.append((index, preds[p][0], preds[p][1]))
    return rows, items


MMSTAR_OPTIONS = {"A": "cat", "B": "rabbit", "C": "mouse", "D": "dog"}


def mmstar_rows():
    spec = [("B", "B", "a lone letter"), ("C", "The answer is (C).", "letter in parentheses among the last words"),
            ("A", "A cat sits. It is B", "two letters: can_infer_option fails, the text 'cat' decides"),
            ("B", "B and C", "two letters, no option text: to the judge"),
            ("B", "B is right because of the first figure here", "a lone letter not among the last four words"),
            ("D", "The correct answer is **D**, since", "'answer is **D**' pattern"),
            ("D", "dog", "option text"), ("A", "Cannot determine the answer", "a refusal reads as Z"),
            ("A", "B", "a wrong letter"), ("C", "it is a mouse or a rabbit", "two option texts: to the judge"),
            ("A", "Z", "a lone Z")]
    rows, items = [], []
    for i, (answer, pred, rule) in enumerate(spec):
        rows.append({"index": str(i), "question": "What animal is shown?", "A": "cat", "B": "rabbit", "C": "mouse",
                     "D": "dog", "answer": answer, "category": "coarse perception" if i % 2 else "math",
                     "l2-category": "image scene", "bench": "MMBench", "image": case_image(i)})
        items.append((str(i), pred, rule))
    return rows, items


def mmstar_na_rows():
    # Option cells pandas reads as missing (its default NA strings): VLMEvalKit's build_choices drops them.
    spec = [("D", {"D": "None"}, "None", "D reads 'None', missing to pandas: 'None' is no option's text: to the judge"),
            ("D", {"D": "None"}, "D", "D reads 'None', missing: 'D' is no option's letter: to the judge"),
            ("C", {"C": "NA"}, "mouse", "C reads 'NA', missing: 'mouse' is no option, nor the judge's 'C'"),
            ("D", {"C": "nan"}, "dog", "C reads 'nan', missing: D's text still read"),
            ("A", {"A": " None"}, "None", "A reads ' None' (a space: no NA string, kept), not in 'None': judge"),
            ("B", {"B": "NULL", "D": "N/A"}, "B or D", "B and D read 'NULL', 'N/A', missing: no option's letters"),
            ("C", {"C": "none"}, "none", "C reads 'none' (lower case: no NA string, kept): its text read")]
    rows, items = [], []
    for i, (answer, cells, pred, rule) in enumerate(spec):
        rows.append({"index": str(i), "question": "What animal is shown?", **(MMSTAR_OPTIONS | cells),
                     "answer": answer, "category": "coarse perception", "l2-category": "image scene",
                     "image": png_b64(i)})
        items.append((str(i), pred, rule))
    return rows, items


def chartqa_rows():
    spec = [("100", "104", "within 5%"), ("100", "106", "beyond 5%"), ("100", "95", "5% below"),
            ("100", "94.9", "just over 5% below"), ("0", "0", "zero: exact text only"),
            ("0", "0.0", "zero: '0.0' is not '0'"), ("12%", "0.12", "a percent gold read as a fraction"),
            ("12", "12%", "a percent prediction read as 0.12"), ("Blue", "blue", "text, case ignored"),
            ("45", "**45**", "the whole prediction, not stripped of markup"),
            ("['a', 'b']", "b", "a list of accepted answers"), ("45", " 45 ", "surrounding space stripped"),
            ("1.5", "The answer is 1.5", "a sentence is not a number")]
    rows, items = [], []
    for i, (answer, pred, rule) in enumerate(spec):
        rows.append({"index": str(i), "question": "What is the value?", "answer": answer,
                     "split": "human" if i % 2 else "augmented", "image": case_image(i)})
        items.append((str(i), pred, rule))
    return rows, items


def mathvista_rows():
    free = {"question_type": "free_form", "choices": "", "answer_option": ""}
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": "['3', '4', '5']", "answer_option": "B",
          "answer": "4"}
    spec = [({**free, "answer_type": "integer", "answer": "3"}, "3", "int(prediction) equals int(answer)"),
            ({**free, "answer_type": "integer", "answer": "3"}, "3.0", "int('3.0') fails: to the judge"),
            ({**free, "answer_type": "integer", "answer": "3"}, "4", "a wrong integer: to the judge"),
            ({**free, "answer_type": "integer", "answer": "0"}, "0", "a right 0 is falsy: to the judge"),
            ({**free, "answer_type": "float", "answer": "1.5"}, "1.50", "float equality"),
            ({**free, "answer_type": "float", "answer": "1.5"}, "1.5 cm", "float('1.5 cm') fails: to the judge"),
            (mc, "B", "the option letter"), (mc, "4", "the option text"),
            (mc, "A", "a wrong letter: prefetched and wrong, never judged"),
            (mc, "no idea", "nothing read: to the judge"),
            ({**free, "answer_type": "text", "answer": "red"}, "red", "text: str(None) compared, to the judge"),
            ({**free, "answer_type": "list", "answer": "[1, 2]"}, "[1, 2]", "list: to the judge")]
    rows, items = [], []
    for i, (fields, pred, rule) in enumerate(spec):
        rows.append({"index": str(i + 1), "image": case_image(i), "question": f"Question {i}?", "unit": "",
                     "precision": "1.0" if fields["answer_type"] == "float" else "", **fields,
                     "task": "figure question answering" if i % 2 else "math word problem",
                     "skills": "['arithmetic reasoning', 'statistical reasoning']" if i % 3 else
                     "['algebraic reasoning']"})
        items.append((str(i + 1), pred, rule))
    return rows, items


def mathvision_rows():
    mc = "['2', '3', '4', '5', '6']"
    spec = [("14", "[]", "14", "the same text"), ("0.5", "[]", "1/2", "equal as arithmetic"),
            ("\\frac{1}{2}", "[]", "0.5", "equal through latex2sympy"),
            ("2", "[]", "\\sqrt{2}", "not equal: to the judge"), ("\\sqrt{2}", "[]", "\\sqrt{2}", "the same LaTeX"),
            ("3", "[]", "x=3", "not equal: to the judge"), ("0", "[]", "0", "a right '0' (a non-empty string)"),
            ("C", mc, "C", "the option letter"), ("C", mc, "4", "the option text"),
            ("C", mc, "A", "a wrong letter: prefetch returns it before is_equal, wrong, never judged"),
            ("C", mc, "The answer is C.", "a letter among the last words")]
    rows, items = [], []
    for i, (answer, choices, pred, rule) in enumerate(spec):
        rows.append({"index": str(i), "image": case_image(i), "question": f"Question {i}?", "answer": answer,
                     "choices": choices, "category": "algebra" if i % 2 else "counting", "level": "1"})
        items.append((str(i), pred, rule))
    return rows, items


def mathverse_rows():
    spec = [("B", "The answer is B.", "every prediction goes to the judge"),
            ("5", "5", "even one equal to the answer (the judge extracts first)")]
    rows, items = [], []
    for i, (answer, pred, rule) in enumerate(spec):
        rows.append({"index": str(i), "image": case_image(i), "problem_index": str(i),
                     "problem_version": "Vision Only" if i else "Text Dominant",
                     "question": f"Question {i}", "answer": answer, "question_type": "multi-choice" if i == 0 else
                     "free-form", "metadata": "{'split': 'testmini', 'subject': 'plane geometry'}",
                     "query_wo": f"Question {i}", "query_cot": f"Question {i}",
                     "question_for_eval": f"As shown, what is {i}?"})
        items.append((str(i), pred, rule))
    return rows, items


def dynamath_rows():
    # (qid, varid, answer_type, answer, prediction, rule); a question's varid-1 row has index == qid,
    # as VLMEvalKit's worst case needs (qid2corr is keyed by the varid-1 rows' index, looked up by qid)
    spec = [(1, 1, "multiple choice", "B", '{"solution": "s", "short answer": "b"}', "JSON letter upper-cased"),
            (1, 2, "multiple choice", "B", "b", "a lone letter"),
            (1, 3, "multiple choice", "B", "I pick the second", "several of ABCDE: to the judge"),
            (2, 1, "float", "3.142", '{"short answer": "3.1425"}', "JSON float within 0.001"),
            (2, 2, "float", "3.142", "3.15 cm", "first word a float, off by more than 0.001"),
            (2, 3, "float", "3.142", "about pi", "no float: to the judge"),
            (3, 1, "free form", "x^2+1", "X^2", "free form: lowercased prediction inside the answer"),
            (3, 2, "free form", "x^2+1", "y", "free form: not inside"),
            (4, 1, "float", "2.0", "2", "digits only"), (4, 2, "float", "6.283", "2\u03c0", "a multiple of pi"),
            (5, 1, "multiple choice", "A", '{"short answer": "A or B"}', "JSON answer with two letters, and the whole text too: to the judge"),
            (5, 2, "multiple choice", "D", "Option D", "one letter of ABCDE in the text")]
    rows, items, next_index = [], [], 6
    for qid, varid, kind, answer, pred, rule in spec:
        index = qid if varid == 1 else next_index
        next_index += varid != 1
        rows.append({"index": str(index), "image": case_image(index), "question": f"Question {qid}.{varid}?",
                     "answer": answer, "answer_type": kind, "qid": str(qid), "varid": str(varid),
                     "subject": "algebra" if qid % 2 else "geometry",
                     "knowledge_level": "high school" if qid < 3 else "undergraduate"})
        items.append((str(index), pred, rule))
    return rows, items


# --------------------------------------------------------------------------- VLMEvalKit's verdicts

def verdict_yorn(vk, data, preds):
    yorn = vk["yorn"]
    data["prediction"] = [str(preds[str(i)]) for i in data["index"]]
    data["extracted"] = [yorn.YOrN_Extraction(p) for p in data["prediction"]]
    data["score"] = data["answer"] == data["extracted"]
    verdicts = {str(i): "judge" if e == "Unknown" else ("right" if s else "wrong")
                for i, e, s in zip(data["index"], data["extracted"], data["score"])}
    return verdicts, data


def run_mme(vk, data, preds, scratch):
    verdicts, data = verdict_yorn(vk, data, preds)
    vk["dump"](data, str(scratch / "mme_auxmatch.tsv"))
    score = vk["yorn"].MME_rating(str(scratch / "mme_auxmatch.tsv")).iloc[0].to_dict()
    metrics = {"score": score["perception"] + score["reasoning"], "perception": score["perception"],
               "cognition": score["reasoning"]}
    metrics.update({f"category={k}": v for k, v in score.items() if k not in ("perception", "reasoning")})
    return verdicts, metrics, ("vlmeval/dataset/utils/yorn.py YOrN_Extraction (image_yorn.py "
                               "ImageYORNDataset.evaluate: score = answer == extracted)",
                               "vlmeval/dataset/utils/yorn.py MME_rating (perception + reasoning)")


def run_hallusion(vk, data, preds, scratch):
    verdicts, data = verdict_yorn(vk, data, preds)
    vk["dump"](data, str(scratch / "hb_auxmatch.tsv"))
    table = vk["yorn"].Hallusion_rating(str(scratch / "hb_auxmatch.tsv"))
    metrics = {}
    cats, l2s = set(data["category"]), set(data["l2-category"])
    for _, row in table.iterrows():
        split = row["split"]
        prefix = "" if split == "Overall" else (f"category={split} " if split in cats else f"l2-category={split} ")
        assert split == "Overall" or (split in cats) != (split in l2s)
        for k in ("aAcc", "fAcc", "qAcc"):
            metrics[prefix + k] = float(row[k])
    metrics["score"] = (metrics["aAcc"] + metrics["fAcc"] + metrics["qAcc"]) / 3
    return verdicts, metrics, ("vlmeval/dataset/utils/yorn.py YOrN_Extraction (image_yorn.py "
                               "ImageYORNDataset.evaluate: score = answer == extracted)",
                               "vlmeval/dataset/utils/yorn.py Hallusion_rating (score: the mean of Overall aAcc, "
                               "fAcc, qAcc)")


def run_mmstar(vk, data, preds, scratch):
    mc = vk["multiple_choice"]
    data["prediction"] = [str(preds[str(i)]) for i in data["index"]]
    verdicts, hits = {}, []
    for i in range(len(data)):
        item = data.iloc[i].copy()
        item["GT"] = item["answer"]
        judge = Judge()
        mc.eval_vanilla(judge, item)
        hit = mc.eval_vanilla(None, item)["hit"]  # exact_matching: no judge, 'Z'
        hits.append(hit)
        verdicts[str(item["index"])] = "judge" if judge.prompts else ("right" if hit else "wrong")
    return verdicts, {"score": 100.0 * sum(hits) / len(hits)}, (
        "vlmeval/dataset/utils/multiple_choice.py eval_vanilla -> extract_answer_from_item (can_infer)",
        "hit of eval_vanilla with model=None (exact_matching), averaged as report_acc's Overall")


def run_chartqa(vk, data, preds, scratch):
    vqa = vk["vqa_eval"]
    data["prediction"] = [str(preds[str(i)]) for i in data["index"]]
    data["answer"] = [str(x) for x in data["answer"]]
    res = [vqa.process_line(data.iloc[i], method="relaxed_accuracy") for i in range(len(data))]
    hit = vqa.hit_calculate(res, "ChartQA_TEST")
    verdicts = {str(i): "right" if h else "wrong" for i, h in zip(data["index"], hit)}
    return verdicts, {"score": float(vk["np"].mean(hit) * 100)}, (
        "vlmeval/dataset/utils/vqa_eval.py process_line(method='relaxed_accuracy') + hit_calculate "
        "(image_vqa.py ImageVQADataset.evaluate_heuristic)", "mean of hit_calculate, times 100 (Overall)")


def _auxeval(vk, data, preds, aux, acc, scratch, name):
    data["prediction"] = [str(preds[str(i)]) for i in data["index"]]
    verdicts, logs, res = {}, [], []
    for i in range(len(data)):
        judge = Judge()
        out = aux(judge, data.iloc[i])
        logs.append(out["log"])
        res.append(out["res"])
        verdicts[str(data.iloc[i]["index"])] = "judge" if judge.prompts else None
    data["log"], data["res"] = logs, res
    vk["dump"](data, str(scratch / f"{name}_judge.tsv"))
    table = acc(str(scratch / f"{name}_judge.tsv"))
    stored = vk["load"](str(scratch / f"{name}_judge.tsv"))  # the acc function reads it back so
    post_check = vk[name].post_check
    for i in range(len(stored)):
        key = str(stored.iloc[i]["index"])
        if verdicts[key] is None:
            verdicts[key] = "right" if post_check(stored.iloc[i], prefetch=False) else "wrong"
    return verdicts, table


def run_mathvista(vk, data, preds, scratch):
    m = vk["mathvista"]
    verdicts, table = _auxeval(vk, data, preds, m.MathVista_auxeval, m.MathVista_acc, scratch, "mathvista")
    overall = table[table["Task&Skill"] == "Overall"]["acc"].iloc[0]
    metrics = {"score": float(overall)}
    for _, row in table.iterrows():
        if row["Task&Skill"] in set(data["task"]):
            metrics[f"task={row['Task&Skill']}"] = float(row["acc"])
        elif row["Task&Skill"] != "Overall":
            metrics[f"skill={row['Task&Skill']}"] = float(row["acc"])
    return verdicts, metrics, ("vlmeval/dataset/utils/mathvista.py MathVista_auxeval (post_check prefetch) and "
                               "post_check on the stored result", "vlmeval/dataset/utils/mathvista.py MathVista_acc")


def run_mathvision(vk, data, preds, scratch):
    m = vk["mathv"]
    verdicts, table = _auxeval(vk, data, preds, m.MATH_V_auxeval, m.MATH_V_acc, scratch, "mathv")
    metrics = {("score" if r["Subject"] == "Overall" else f"category={r['Subject']}"): float(r["acc"])
               for _, r in table.iterrows()}
    return verdicts, metrics, ("vlmeval/dataset/utils/mathv.py MATH_V_auxeval (post_check prefetch, is_equal) and "
                               "post_check on the stored result", "vlmeval/dataset/utils/mathv.py MATH_V_acc")


def run_mathverse(vk, data, preds, scratch):
    m = vk["mathverse"]
    data["prediction"] = [str(preds[str(i)]) for i in data["index"]]
    verdicts, right = {}, []
    for i in range(len(data)):
        judge = Judge()
        line = data.iloc[i].copy()
        line["extract"] = m.MathVerse_auxeval_extract(judge, line)["extract"]
        score = m.MathVerse_auxeval_score(judge, line)["score"]
        right.append(bool(score))
        verdicts[str(line["index"])] = "judge" if judge.prompts else ("right" if score else "wrong")
    return verdicts, {"score": 100.0 * sum(right) / len(right)}, (
        "vlmeval/dataset/utils/mathverse.py MathVerse_auxeval_extract, MathVerse_auxeval_score",
        "share of MathVerse_auxeval_score's score with every judge call failing (MathVerse_acc's Overall)")


def run_dynamath(vk, data, preds, scratch):
    d = vk["dynamath"]
    data["prediction"] = [str(preds[str(i)]) for i in data["index"]]
    verdicts = {}
    for i in range(len(data)):
        judge = Judge()
        out = d.DynaMath_auxeval(judge, data.iloc[i])
        verdicts[str(data.iloc[i]["index"])] = "judge" if judge.prompts else ("right" if out["correct"] else "wrong")
    eval_file = scratch / "dynamath.tsv"
    vk["dump"](data, str(eval_file))
    judge = Judge()
    d.build_judge = lambda **kw: judge
    table = d.Dynamath.evaluate(None, str(eval_file), model="failing")
    (HERE / "prompts").mkdir(exist_ok=True)
    (HERE / "prompts" / "DynaMath.system.txt").write_text(
        "# The system prompt VLMEvalKit's dynamath.py Dynamath.evaluate gives its judge (model.system_prompt);\n"
        "# written by make_expected.py. The prompt is everything after the next line, byte for byte.\n"
        "# ---8<---\n" + judge.system_prompt, encoding="utf-8")
    metrics = {}
    for _, row in table.iterrows():
        prefix = "" if row["Setting"] == "Average" else "worst_case "
        for k, v in row.items():
            if k == "Setting" or (isinstance(v, float) and v != v):
                continue
            key = {"Overall": "score" if not prefix else "worst_case"}.get(k)
            if key is None:
                key = prefix + (f"subject={k[8:]}" if k.startswith("Subject-") else f"knowledge_level={k[6:]}")
            metrics[key] = 100.0 * float(v)
    return verdicts, metrics, ("vlmeval/dataset/dynamath.py DynaMath_auxeval",
                               "vlmeval/dataset/dynamath.py Dynamath.evaluate (Average and Worst Case, times 100)")


def chartqa_numeric_rows():
    # every answer a number, one with a fraction: pandas reads the column as float ("0" -> "0.0")
    spec = [("0", "0", "pandas: gold '0.0', exact text only, '0' differs"), ("0", "0.0", "pandas: gold '0.0'"),
            ("12", "12", "pandas: gold '12.0', equal as numbers"), ("2.5", "2.5", "a fraction")]
    rows, items = [], []
    for i, (answer, pred, rule) in enumerate(spec):
        rows.append({"index": str(i), "question": "What is the value?", "answer": answer, "image": case_image(i)})
        items.append((str(i), pred, rule))
    return rows, items


def mathvista_numeric_rows():
    # every answer a number, one with a fraction: pandas reads "3" as 3.0, and int("3.0") fails
    spec = [("integer", "3", "3", "pandas: gold 3.0, a float: int() of it is 3"),
            ("float", "1.5", "1.5", "float equality"), ("integer", "7", "7.0", "int('7.0') fails: to the judge")]
    rows, items = [], []
    for i, (kind, answer, pred, rule) in enumerate(spec):
        rows.append({"index": str(i + 1), "image": case_image(i), "question": f"Question {i}?", "answer": answer,
                     "question_type": "free_form", "answer_type": kind, "choices": "", "answer_option": "",
                     "task": "math word problem", "skills": "['arithmetic reasoning']"})
        items.append((str(i + 1), pred, rule))
    return rows, items


BENCHES = {"ChartQA_numeric": (chartqa_numeric_rows, run_chartqa),
           "MathVista_numeric": (mathvista_numeric_rows, run_mathvista),
           "MME": (mme_rows, run_mme), "HallusionBench": (hallusion_rows, run_hallusion),
           "MMStar": (mmstar_rows, run_mmstar), "MMStar_na": (mmstar_na_rows, run_mmstar), "ChartQA": (chartqa_rows, run_chartqa),
           "MathVista": (mathvista_rows, run_mathvista), "MathVision": (mathvision_rows, run_mathvision),
           "MathVerse": (mathverse_rows, run_mathverse), "DynaMath": (dynamath_rows, run_dynamath)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("vlmevalkit", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        commit = copy_sources(args.vlmevalkit, scratch)
        vk = vlmevalkit(scratch)
        for name, (make, run) in BENCHES.items():
            rows, items = make()
            write_tsv(HERE / f"{name}.tsv", rows, image=False)
            data, no_image = dataset_frame(vk, HERE / f"{name}.tsv")
            preds = {index: pred for index, pred, _ in items}
            (HERE / "prompts").mkdir(exist_ok=True)
            for old in (HERE / "prompts").glob(f"{name}.*.*.txt"):
                old.unlink()
            for index, prompts in judge_prompts(vk, name, data, preds):
                for n, prompt in enumerate(prompts):
                    header = PROMPT_HEADER.format(source=PROMPT_SOURCES[name.split("_")[0]], index=index, name=name,
                                                  prediction=preds[index], commit=commit)
                    (HERE / "prompts" / f"{name}.{index}.{n}.txt").write_text(header + prompt, encoding="utf-8")
            verdicts, metrics, (item_source, metric_source) = run(vk, data, preds, scratch)
            assert set(verdicts) == set(preds), (name, set(verdicts) ^ set(preds))
            expected = {"benchmark": name.split("_")[0], "vlmevalkit_commit": commit, "no_image": no_image,
                        "items": [{"index": index, "prediction": pred, "rule": rule, "verdict": verdicts[index],
                                   "vlmevalkit": item_source} for index, pred, rule in items],
                        "metrics": {k: metrics[k] for k in sorted(metrics)}, "metrics_vlmevalkit": metric_source}
            (HERE / f"{name}.expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
            print(name, {v: list(verdicts.values()).count(v) for v in ("right", "wrong", "judge")})


if __name__ == "__main__":
    main()
