"""The questions r1vl asks, byte for byte against the text VLMEvalKit's own classes build.

cases/questions/<Benchmark>.tsv holds rows in VLMEvalKit's TSV layout (for MMStar: hints and
options reading every one of pandas' default NA strings, look-alikes that are not NA strings,
tabs, quotes and line breaks, a column of numbers and empty cells, a Chinese question; DynaMath:
each answer type). <Benchmark>.json holds, per row, the text of the message VLMEvalKit builds:

- "vlmevalkit": the dataset class's build_prompt (image_mcq.py, image_vqa.py, image_yorn.py,
  dynamath.py), which r1vl's `vlmevalkit` protocol must send;
- "qwen2vl": what VLMEvalKit's inference sends Qwen2VLChat(use_custom_prompt=True) (Qwen2-VL in
  its config): vlm/qwen2_vl/prompt.py Qwen2VLPromptMixin where use_custom_prompt(dataset) holds,
  else the dataset's; r1vl's `qwen2vl` protocol must send it;
- the same two on the file read with keep_default_na=False, na_values=[''] ("+na-text"), which
  r1vl's --fix na-text must send.

cases/make_questions.py produced them, run by hand on VLMEvalKit's source at the commit each file
records: those classes rebuilt from their own source text and run on rows read by pandas as
VLMEvalKit reads them. Nothing here imports VLMEvalKit or pandas.
"""
import csv
import json
import re
from pathlib import Path

import pytest

from r1vl.eval import benchmarks, protocols
from r1vl.eval.tsv import PANDAS_NA_STRINGS

QUESTIONS = Path(__file__).parent / "cases" / "questions"
NAMES = ["MMStar", "HallusionBench", "MME", "ChartQA", "MathVista", "MathVision", "MathVerse", "DynaMath"]
VARIANTS = ["vlmevalkit", "qwen2vl", "vlmevalkit+na-text", "qwen2vl+na-text"]


def _expected(name: str) -> dict:
    return json.loads((QUESTIONS / f"{name}.json").read_text(encoding="utf-8"))


def _asked(name: str, variant: str) -> dict[str, str]:
    protocol, _, fix = variant.partition("+")
    bench = benchmarks.get(name)
    table = benchmarks.load(bench, QUESTIONS / f"{name}.tsv", keep_na_text=fix == "na-text")
    return {item.index: bench.question(item, protocol) for item in table.items}


def test_every_benchmark_and_protocol_has_cases():
    tsv = {n for n, b in benchmarks.BENCHMARKS.items() if b.layout == "tsv"}
    assert tsv == set(NAMES)
    assert set(protocols.CONCRETE) - {"paper"} == {v.partition("+")[0] for v in VARIANTS}
    commits = set()
    for name in NAMES:
        expected = _expected(name)
        assert expected["benchmark"] == name and set(expected["questions"]) == set(VARIANTS)
        assert all(expected["questions"][v] for v in VARIANTS)
        commits.add(expected["vlmevalkit_commit"])
    assert len(commits) == 1 and re.fullmatch(r"[0-9a-f]{40}", commits.pop())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", NAMES)
def test_questions_equal_vlmevalkit(name, variant):
    want = _expected(name)["questions"][variant]
    got = _asked(name, variant)
    assert set(got) == set(want)  # every row asked, none dropped
    wrong = [(index, got[index], want[index]) for index in want if got[index] != want[index]]
    assert not wrong, f"(index, r1vl, VLMEvalKit): {wrong}"


def test_cases_reach_what_they_are_for():
    # MMStar: every pandas NA string sits in a hint or option, and reading them as missing matters
    with (QUESTIONS / "MMStar.tsv").open(encoding="utf-8", newline="") as f:
        cells = {row[k] for row in csv.DictReader(f, delimiter="\t") for k in ("hint", "A", "B", "C", "D")}
    assert PANDAS_NA_STRINGS <= cells
    mmstar = _expected("MMStar")["questions"]
    changed = [i for i in mmstar["vlmevalkit"] if mmstar["vlmevalkit"][i] != mmstar["vlmevalkit+na-text"][i]]
    assert len(changed) >= 6
    assert "Hint: None\n" in mmstar["vlmevalkit+na-text"]["1"] and "None" not in mmstar["vlmevalkit"]["1"]
    assert mmstar["qwen2vl"]["4"].endswith("请直接回答选项字母。")
    # DynaMath: each answer type, with VLMEvalKit's blank lines around "Example of expected JSON response format:"
    dynamath = _expected("DynaMath")["questions"]["vlmevalkit"]
    assert len(dynamath) == 3 and all("\n\nExample of expected JSON response format:\n\n{" in q
                                      for q in dynamath.values())
    # The Qwen2-VL prompts differ from the dataset prompts everywhere but MME, which the mixin leaves alone.
    for name in NAMES:
        q = _expected(name)["questions"]
        assert (q["qwen2vl"] == q["vlmevalkit"]) == (name == "MME"), name


def test_missing_question_is_a_bad_row(tmp_path):
    # pandas reads a question cell "None" as missing: VLMEvalKit would ask "Question: nan"
    from evalkit_files import write_tsv

    from r1vl.eval.tsv import EvalInputError

    rows = [{"index": "0", "question": "None", "A": "cat", "B": "dog", "answer": "A"},
            {"index": "1", "question": "What is it?", "A": "cat", "B": "dog", "answer": "A"}]
    path = write_tsv(tmp_path / "mmstar.tsv", rows)
    with pytest.raises(EvalInputError, match=r"mmstar.tsv: row 1 \(index 0\): no question"):
        benchmarks.load(benchmarks.get("MMStar"), path)
    table = benchmarks.load(benchmarks.get("MMStar"), path, skip_bad_rows=True)
    assert [i.index for i in table.items] == ["1"] and len(table.skipped) == 1
    kept = benchmarks.load(benchmarks.get("MMStar"), path, keep_na_text=True)
    assert protocols.question("MMStar", kept.items[0], "qwen2vl").startswith("Question: None\nOptions:\nA. cat")
