"""Write the question case files of questions/: <Benchmark>.tsv (rows in VLMEvalKit's TSV layout)
and <Benchmark>.json (the text VLMEvalKit's own classes ask for each row, per protocol).

    python tests/r1vl/eval/cases/make_questions.py VLMEVALKIT

VLMEVALKIT is a checkout of github.com/open-compass/VLMEvalKit or its bare git directory (its
HEAD is read and recorded). As make_expected.py does, nothing of it is installed or imported as
a package: the classes that build prompts are rebuilt from their own source, each class
statement of vlmeval/dataset/{image_base,image_mcq,image_vqa,image_yorn,dynamath}.py taken with
the members prompts need (build_prompt, supported_datasets, TYPE, DATASET_URL, DynaMath's GUIDE,
EXAMPLE, TEXT_EXAMPLE) and run as written; vlm/qwen2_vl/prompt.py (Qwen2VLPromptMixin) is loaded
whole, and dataset/__init__.py's DATASET_TYPE is run over the rebuilt classes. dump_image is
stubbed (it only names the image file); smp/misc.py's toliststr and istype are VLMEvalKit's own.

Each TSV is read as VLMEvalKit reads it (smp/file.py load: pandas.read_csv(sep='\\t')), and
cleaned as ImageBaseDataset.__init__ does (make_expected.dataset_frame). The variants:

- "vlmevalkit": the dataset class's build_prompt (what VLMEvalKit sends a model without custom
  prompts);
- "qwen2vl": what inference.py sends Qwen2VLChat(use_custom_prompt=True): the mixin's
  build_prompt where model.use_custom_prompt(dataset) holds, else the dataset's;
- "<variant>+na-text": the same classes on the file read with keep_default_na=False,
  na_values=[''] (only empty cells missing), which is what r1vl's --fix na-text reads.

The question text is the message's single text part (after its single image). Needs pandas,
numpy, Pillow; run by hand when the cases change, never by the tests (they read the files).
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import string
import subprocess
import sys
import types
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_expected as mx  # noqa: E402  (after sys.path above) its VLMEvalKit loaders and case writers

OUT = HERE / "questions"
# r1vl's benchmark -> the VLMEvalKit dataset name its TSV is (VLMEvalKit decides prompts by this name)
DATASETS = {"MMStar": "MMStar", "HallusionBench": "HallusionBench", "MME": "MME", "ChartQA": "ChartQA_TEST",
            "MathVista": "MathVista_MINI", "MathVision": "MathVision", "MathVerse": "MathVerse_MINI",
            "DynaMath": "DynaMath"}
# (file, class) in base-first order: the classes whose build_prompt the eight datasets use
CLASSES = [("image_base.py", "ImageBaseDataset"), ("image_mcq.py", "ImageMCQDataset"),
           ("image_vqa.py", "ImageVQADataset"), ("image_vqa.py", "MathVista"), ("image_vqa.py", "MathVerse"),
           ("image_vqa.py", "MathVision"), ("image_yorn.py", "ImageYORNDataset"), ("dynamath.py", "Dynamath")]
MEMBERS = {"TYPE", "DATASET_URL", "GUIDE", "EXAMPLE", "TEXT_EXAMPLE", "build_prompt", "supported_datasets"}
READINGS = {"": {}, "+na-text": {"keep_default_na": False, "na_values": [""]}}


# --------------------------------------------------------------------------- VLMEvalKit, loaded

def git_text(root: Path, rel: str) -> str:
    if (root / "vlmeval").is_dir():
        return (root / rel).read_text(encoding="utf-8")
    return subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{rel}"], check=True,
                          capture_output=True, text=True).stdout


def git_commit(root: Path) -> str:
    where = ["-C", str(root)] if (root / "vlmeval").is_dir() else ["--git-dir", str(root)]
    return subprocess.run(["git", *where, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def git_ls(root: Path, folder: str) -> list[str]:
    where = ["-C", str(root)] if (root / "vlmeval").is_dir() else ["--git-dir", str(root)]
    return subprocess.run(["git", *where, "ls-tree", "--name-only", "HEAD", folder], check=True,
                          capture_output=True, text=True).stdout.split()


def pull_text(source: str, filename: str, names: list[str], namespace: dict) -> dict:
    """The top-level functions `names` of a source text, defined in `namespace` (make_expected.pull)."""
    body = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in body} == set(names), (filename, names)
    exec(compile(ast.Module(body=body, type_ignores=[]), filename, "exec"), namespace)  # noqa: S102  VLMEvalKit's own code
    return namespace


def _member(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def rebuild_class(source: str, filename: str, name: str, namespace: dict) -> type:
    """The class `name` of a source file, with only MEMBERS kept from its body, run in `namespace`."""
    tree = ast.parse(source)
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    assert len(found) == 1, (filename, name)
    cls = copy.copy(found[0])
    cls.body = [n for n in found[0].body if _member(n) in MEMBERS]
    cls.keywords = []  # ImageBaseDataset's ABCMeta: its abstract evaluate() is not rebuilt
    cls.decorator_list = []
    exec(compile(ast.Module(body=[cls], type_ignores=[]), filename, "exec"), namespace)  # noqa: S102  its own code
    return namespace[name]


def dataset_url_owners(root: Path, files: list[str], dataset: str) -> list[str]:
    """Every class of the dataset files whose literal DATASET_URL names `dataset`."""
    owners = []
    for rel in files:
        for node in ast.walk(ast.parse(git_text(root, rel))):
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if _member(stmt) == "DATASET_URL" and isinstance(stmt.value, ast.Dict):
                    keys = {k.value for k in stmt.value.keys if isinstance(k, ast.Constant)}
                    if dataset in keys:
                        owners.append(f"{rel} {node.name}")
    return owners


def vlmevalkit(root: Path) -> dict:
    import numpy as np
    import pandas as pd

    ns = {"pd": pd, "np": np, "json": json, "string": string, "warnings": warnings}
    pull_text(git_text(root, "vlmeval/smp/misc.py"), "vlmeval/smp/misc.py", ["toliststr", "istype"], ns)
    classes = {}
    for file, name in CLASSES:
        rel = f"vlmeval/dataset/{file}"
        classes[name] = rebuild_class(git_text(root, rel), rel, name, ns)
    registry = {"DATASET_CLASSES": [c for n, c in classes.items() if n != "ImageBaseDataset"],
                "ConcatDataset": types.SimpleNamespace(DATASET_SETS={}), "np": np, "warnings": warnings}
    pull_text(git_text(root, "vlmeval/dataset/__init__.py"), "vlmeval/dataset/__init__.py", ["DATASET_TYPE"],
                 registry)
    mx.module("vlmeval")
    mx.module("vlmeval.dataset", DATASET_TYPE=registry["DATASET_TYPE"])
    mixin_src = git_text(root, "vlmeval/vlm/qwen2_vl/prompt.py")
    mixin = types.ModuleType("vlmeval.vlm.qwen2_vl.prompt")
    exec(compile(mixin_src, "vlmeval/vlm/qwen2_vl/prompt.py", "exec"), mixin.__dict__)  # noqa: S102  its own code
    return {"pd": pd, "np": np, "classes": classes, "DATASET_TYPE": registry["DATASET_TYPE"],
            "Qwen2VLPromptMixin": mixin.Qwen2VLPromptMixin, "istype": ns["istype"],
            "dataset_files": [f for f in git_ls(root, "vlmeval/dataset/") if f.endswith(".py")]}


def dataset_for(vk: dict, name: str):
    """The dataset object VLMEvalKit's build_dataset makes for `name`, as far as prompts go."""
    owners = [c for n, c in vk["classes"].items() if n != "ImageBaseDataset" and name in c.supported_datasets()]
    assert len(owners) == 1, (name, owners)
    ds = owners[0].__new__(owners[0])
    ds.dataset_name, ds.meta_only = name, False
    ds.dump_image = lambda line: [f"images/{line['index']}.png"]  # image_base.py dump_image's return: a path list
    return ds


def qwen2vl_chat(mixin: type):
    """Qwen2VLChat as far as prompts go: its mixin, use_custom_prompt=True (config.py's Qwen2-VL)."""
    return type("Qwen2VLChat", (mixin,), {})(use_custom_prompt=True)


def text_of(msgs: list[dict]) -> str:
    assert [m["type"] for m in msgs] == ["image", "text"], msgs
    assert isinstance(msgs[1]["value"], str), msgs
    return msgs[1]["value"]


def questions(vk: dict, bench: str, tsv: Path) -> tuple[dict, dict]:
    """{variant: {index: text}} and what each variant ran."""
    name = DATASETS[bench]
    ds = dataset_for(vk, name)
    model = qwen2vl_chat(vk["Qwen2VLPromptMixin"])
    model.set_dump_image(ds.dump_image)
    custom = model.use_custom_prompt(name)
    out, ran = {}, {}
    pd = vk["pd"]
    for suffix, options in READINGS.items():
        loaders = {"load": lambda f, options=options: pd.read_csv(f, sep="\t", **options), "pd": pd, "np": vk["np"],
                   "smp": types.SimpleNamespace(istype=vk["istype"])}
        data, _ = mx.dataset_frame(loaders, tsv)
        plain, qwen = {}, {}
        for i in range(len(data)):
            line = data.iloc[i]
            plain[str(line["index"])] = text_of(ds.build_prompt(line))
            # inference.py infer_data: no force_use_dataset_prompt on these datasets, so the model's
            # prompt where it has one for the dataset, else the dataset's
            assert not getattr(ds, "force_use_dataset_prompt", False)
            msgs = model.build_prompt(line, dataset=name) if custom else ds.build_prompt(line)
            qwen[str(line["index"])] = text_of(msgs)
        out["vlmevalkit" + suffix], out["qwen2vl" + suffix] = plain, qwen
    ran["vlmevalkit"] = f"{type(ds).__name__}.build_prompt ({type(ds).build_prompt.__code__.co_filename})"
    ran["qwen2vl"] = (f"Qwen2VLPromptMixin.build_prompt (use_custom_prompt({name!r}) is True, DATASET_TYPE "
                      f"{vk['DATASET_TYPE'](name)!r})" if custom else
                      f"use_custom_prompt({name!r}) is False: the dataset's {ran['vlmevalkit']}")
    return out, ran


# --------------------------------------------------------------------------- cases

# Every one of pandas' default NA strings appears in an MMStar option or hint below.
NA_CELLS = ["#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
            "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def mmstar_rows():
    q = "What animal is shown?"
    spec = [  # (question, hint, A, B, C, D, E)
        (q, "", "cat", "rabbit", "mouse", "dog", ""),
        (q, "None", "cat", "rabbit", "mouse", "None", ""),  # the case: hint and option read 'None'
        (q, "A hint that mentions None.", "cat", "rabbit", "NA", "nan", ""),
        (q, "null", "cat", "rabbit", "N/A", "NULL", ""),
        ("图中是什么动物？", "", "猫", "兔子", "老鼠", "狗", ""),  # Chinese: the mixin's Chinese instruction
        (q, "", " None", "none", "NONE", "None ", ""),  # not NA strings: spaces and case count
        ('Which one is "right"?\tAnswer\nbelow', "Line one\nline two", "a\tb", 'say "hi"', "", "", ""),
        (q, "", "cat", "rabbit", "", "", "5"),  # E: numbers, empty and NA cells: float64 ("5.0") unless NA is text
        (q, "1.#IND", "cat", "rabbit", "<NA>", "#N/A", "NA"),
        (q, "#NA", "cat", "rabbit", "-1.#IND", "1.#QNAN", ""),
        (q, "n/a", "cat", "rabbit", "-NaN", "-1.#QNAN", ""),
        (q, "-nan", "cat", "rabbit", "#N/A N/A", "NaN", ""),
        (q, "", "", "", "", "", ""),  # no options at all: no instruction line
    ]
    rows = []
    for i, (question, hint, a, b, c, d, e) in enumerate(spec):
        rows.append({"index": str(i), "image": mx.png_b64(i), "question": question, "hint": hint, "A": a, "B": b,
                     "C": c, "D": d, "E": e, "answer": "A", "category": "coarse perception",
                     "l2-category": "image scene"})
    used = {cell for r in rows for k, cell in r.items() if k in ("hint", "A", "B", "C", "D")}
    assert set(NA_CELLS) <= used, set(NA_CELLS) - used
    return rows


def hallusion_rows():
    spec = [("Is the line above 3? Please answer yes or no.", "Yes"), ("Is the line above 3?", "No"),
            ("Does the chart answer Yes or No questions?", "No"), ("Is the value None here?", "Yes")]
    return [{"index": f"VS_chart_{i}_0_{i % 2}_0", "image": mx.png_b64(i), "category": "VS",
             "subcategory": "chart", "l2-category": "chart", "question": q, "answer": a}
            for i, (q, a) in enumerate(spec)]


def mme_rows():
    spec = [("Is there a cat in this image? Please answer yes or no.", "Yes", "existence"),
            ("Is there a dog in this image? Please answer yes or no.", "No", "existence"),
            ("Is the word 'NA' written here? Please answer yes or no.", "Yes", "OCR")]
    return [{"index": str(i), "image": mx.png_b64(i), "question": q, "answer": a, "category": c,
             "image_path": f"{c}/{i}.jpg"} for i, (q, a, c) in enumerate(spec)]


def chartqa_rows():
    spec = [("What is the value of the blue bar in 2019?", "42"), ("Which year has the highest sales?", "2020"),
            ("How many bars are shown?", "7")]
    return [{"index": str(i), "image": mx.png_b64(i), "question": q, "answer": a, "split": "human"}
            for i, (q, a) in enumerate(spec)]


def mathvista_rows():
    free = ("Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, "
            "3, at the end.\nQuestion: How many objects are left?")
    choice = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
              "end.\nQuestion: Which is larger?\nChoices:\n(A) 1\n(B) 2")
    return [{"index": "1", "image": mx.png_b64(1), "question": free, "answer": "3", "question_type": "free_form",
             "answer_type": "integer", "choices": "", "answer_option": "", "task": "math word problem"},
            {"index": "2", "image": mx.png_b64(2), "question": choice, "answer": "2", "question_type": "multi_choice",
             "answer_type": "text", "choices": "['1', '2']", "answer_option": "B", "task": "figure question answering"}]


def mathvision_rows():
    return [{"index": "1", "image": mx.png_b64(1), "question": "Which shape comes next?\n(A) square\n(B) circle",
             "answer": "A", "choices": "['square', 'circle']", "category": "logic"},
            {"index": "2", "image": mx.png_b64(2), "question": "How many dots are there?", "answer": "12",
             "choices": "[]", "category": "counting"}]


def mathverse_rows():
    return [{"index": "1", "image": mx.png_b64(1), "question": "As shown in the figure, find the angle ABC.",
             "answer": "40°", "question_for_eval": "find the angle ABC", "problem_version": "Vision Only"},
            {"index": "2", "image": mx.png_b64(2), "question": "According to the question shown in the image, "
             "please directly answer the question.", "answer": "B", "question_for_eval": "Which is it?",
             "problem_version": "Vision Only"}]


def dynamath_rows():
    spec = [("Which of the graphs is increasing?\nA. f\nB. g", "A", "multiple choice"),
            ("What is the area of the circle?", "3.142", "float"), ("What is the function's formula?", "x^2+1",
                                                                    "free form")]
    return [{"index": str(i), "image": mx.png_b64(i), "question": q, "answer": a, "answer_type": kind,
             "qid": str(i), "varid": "1", "subject": "algebra", "knowledge_level": "high school"}
            for i, (q, a, kind) in enumerate(spec)]


ROWS = {"MMStar": mmstar_rows, "HallusionBench": hallusion_rows, "MME": mme_rows, "ChartQA": chartqa_rows,
        "MathVista": mathvista_rows, "MathVision": mathvision_rows, "MathVerse": mathverse_rows,
        "DynaMath": dynamath_rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("vlmevalkit", type=Path)
    args = parser.parse_args()
    import pandas as pd

    vk = vlmevalkit(args.vlmevalkit)
    commit = git_commit(args.vlmevalkit)
    OUT.mkdir(exist_ok=True)
    for bench, make in ROWS.items():
        owners = dataset_url_owners(args.vlmevalkit, vk["dataset_files"], DATASETS[bench])
        assert len(owners) == 1, (bench, owners)  # one class serves the name: the one rebuilt here
        tsv = OUT / f"{bench}.tsv"
        mx.write_tsv(tsv, make())
        texts, ran = questions(vk, bench, tsv)
        expected = {"benchmark": bench, "vlmevalkit_dataset": DATASETS[bench], "vlmevalkit_commit": commit,
                    "pandas": pd.__version__, "dataset_class": owners[0], "built_by": ran,
                    "readings": {"": "pandas.read_csv(f, sep='\\t') (smp/file.py load)",
                                 "+na-text": "pandas.read_csv(f, sep='\\t', keep_default_na=False, na_values=[''])"},
                    "questions": texts}
        (OUT / f"{bench}.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        print(bench, ran["qwen2vl"][:60], {k: len(v) for k, v in texts.items()})


if __name__ == "__main__":
    main()
