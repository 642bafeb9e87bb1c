"""r1vl's scoring against VLMEvalKit's on the case files of cases/ (one per benchmark).

Each <Benchmark>.tsv is a benchmark file in VLMEvalKit's TSV layout (base64 PNGs; MME's second
question of an image refers to the first one's row; HallusionBench has an empty-image row;
MMStar_na has options reading "None", "NA", "nan", ..., which pandas reads as missing). Its
<Benchmark>.expected.json gives, per item, the prediction, the rule side it probes, and the
verdict VLMEvalKit gives ("right", "wrong", or "judge": VLMEvalKit would ask its judge), with the
VLMEvalKit file and function it comes from, and the metrics VLMEvalKit reports on the file.

How the expected values were produced: cases/make_expected.py, run by hand on a checkout of
open-compass/VLMEvalKit (the commit is recorded in each expected file), loads VLMEvalKit's own
source files (utils/yorn.py, multiple_choice.py, vqa_eval.py, mathvista.py, mathv.py,
mathverse.py, dynamath.py, matching_util.py; smp/misc.py's and smp/vlm.py's pure helpers) into
a scratch directory with their heavy imports stubbed, reads each TSV with pandas as VLMEvalKit
does, and runs the per-item functions and rating functions named in the expected file; a judge
that records being asked and always fails marks the "judge" items, and the metrics are
VLMEvalKit's with every judge call failing (exact_matching for MMStar). Without a judge r1vl
marks those items pending and scores them wrong: the same metrics.
"""
import json
import math
from pathlib import Path

import pytest

from r1vl.eval import benchmarks

CASES = Path(__file__).parent / "cases"
NAMES = ["MME", "HallusionBench", "MMStar", "ChartQA", "MathVista", "MathVision", "MathVerse", "DynaMath"]
# All-number answer columns, which pandas (VLMEvalKit's reader) turns into float (r1vl.eval.tsv.pandas_numbers)
NUMERIC = ["ChartQA_numeric", "MathVista_numeric"]
# Option cells reading "None", "NA", "nan", ..., which pandas reads as missing (r1vl.eval.tsv.pandas_missing)
NA = ["MMStar_na"]


def _expected(name: str) -> dict:
    return json.loads((CASES / f"{name}.expected.json").read_text(encoding="utf-8"))


def _scored(name: str):
    expected = _expected(name)
    bench = benchmarks.get(expected["benchmark"])
    table = benchmarks.load(bench, CASES / f"{name}.tsv")
    by_index = {item.index: item for item in table.items}
    scored, got = [], {}
    for case in expected["items"]:
        item = by_index[case["index"]]
        v = bench.score(item, case["prediction"], None, frozenset())
        got[case["index"]] = "judge" if v.pending else ("right" if v.correct else "wrong")
        scored.append((item, v))
    return bench, table, expected, scored, got


def test_every_benchmark_has_a_case_file():
    tsv = {n for n, b in benchmarks.BENCHMARKS.items() if b.layout == "tsv"}
    assert tsv == set(NAMES)
    for name in NAMES:
        expected = _expected(name)
        assert expected["benchmark"] == name and expected["items"]
        assert all(case["vlmevalkit"].startswith("vlmeval/") for case in expected["items"])
        assert {"right", "wrong"} <= {c["verdict"] for c in expected["items"]} or name == "MathVerse"


@pytest.mark.parametrize("name", NAMES + NUMERIC + NA)
def test_each_item_verdict_equals_vlmevalkit(name):
    _, table, expected, _, got = _scored(name)
    assert {i.index for i in table.items} == {c["index"] for c in expected["items"]}  # every row has a case
    wrong = [(c["index"], c["prediction"], c["rule"], c["verdict"], got[c["index"]])
             for c in expected["items"] if got[c["index"]] != c["verdict"]]
    assert not wrong, f"(index, prediction, rule, VLMEvalKit, r1vl): {wrong}"


@pytest.mark.parametrize("name", NAMES + NUMERIC + NA)
def test_metrics_equal_vlmevalkit(name):
    bench, _, expected, scored, _ = _scored(name)
    metrics = bench.aggregate(scored)
    for key, value in expected["metrics"].items():
        assert key in metrics, (key, sorted(metrics))
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert not math.isnan(metrics["score"])


def test_skipped_rows_and_image_references():
    # image_base.py ImageBaseDataset(skip_noimg=True): HallusionBench's empty-image row is dropped, counted
    _, table, expected, _, _ = _scored("HallusionBench")
    assert table.no_image == expected["no_image"] == ["VD_map_6_1_1_1"]
    # MME: each image's second question refers to the first one's row; both pair by image_path
    mme = benchmarks.load(benchmarks.get("MME"), CASES / "MME.tsv")
    assert all(len(item.image_b64) > 64 for item in mme.items)
    raw = (CASES / "MME.tsv").read_text(encoding="utf-8").splitlines()
    assert sum(1 for line in raw[1:] if 0 < len(line.split("\t")[1]) <= 64) == len(mme.items) // 2


# --------------------------------------------------------------------------- the judge's prompts

PROMPTS = CASES / "prompts"
CUT = "# ---8<---\n"


def _fixture(path: Path) -> str:
    """A prompt fixture's text after its header (make_expected.py wrote it from VLMEvalKit's builders)."""
    return path.read_text(encoding="utf-8").split(CUT, 1)[1]


def stub_reply(prompt: str) -> str:
    """make_expected.py's stub_reply: the judge's answers the fixtures were made with."""
    if "Yes / No" in prompt:
        return "No"
    return "1" if prompt.endswith("Judgement:") else "C"


@pytest.mark.parametrize("name", NAMES + NA)
def test_judge_prompts_equal_vlmevalkit_builders(name, chat_server):
    # A stub judge on 127.0.0.1 records every request; each item VLMEvalKit would send to its judge
    # must send the very prompts VLMEvalKit's builders make (cases/prompts/<name>.<index>.<n>.txt), in order.
    from r1vl.eval.judge import Judge

    bench, table, expected, _, _ = _scored(name)
    server = chat_server(stub_reply)
    judge = Judge(server.url)
    ask = lambda p, t, s: judge(p, t, s)  # noqa: E731
    by_index = {item.index: item for item in table.items}
    fixtures = {p.name for p in PROMPTS.glob(f"{name}.*.*.txt")}
    asked = set()
    for case in expected["items"]:
        before = len(server.requests)
        bench.score(by_index[case["index"]], case["prediction"], ask, frozenset())
        sent = server.requests[before:]
        want = sorted((p for p in fixtures if p.startswith(f"{name}.{case['index']}.")),
                      key=lambda p: int(p.rsplit(".", 2)[1]))
        assert [r["body"]["messages"][-1]["content"] for r in sent] == [_fixture(PROMPTS / p) for p in want], \
            case["index"]
        assert bool(sent) == (case["verdict"] == "judge"), case["index"]
        for r in sent:
            system = [m["content"] for m in r["body"]["messages"] if m["role"] == "system"]
            assert system == ([_fixture(PROMPTS / "DynaMath.system.txt")] if name == "DynaMath" else [])
        asked |= set(want)
    assert asked == fixtures  # every fixture belongs to an item


def test_pandas_numbers():
    # pandas.read_csv's dtypes as str() shows them: whole numbers stay, a fraction or an empty cell makes floats
    from r1vl.eval.tsv import pandas_numbers

    rows = [(1, {"index": "1", "a": "12", "b": "12", "c": "12", "d": "x", "e": "007"}),
            (2, {"index": "2", "a": "0", "b": "2.5", "c": "", "d": "3", "e": "1e3"})]
    assert pandas_numbers(rows) == frozenset({"b", "c", "e"})
    assert [r[1] for r in rows] == [{"index": "1", "a": "12", "b": "12.0", "c": "12.0", "d": "x", "e": "7.0"},
                                    {"index": "2", "a": "0", "b": "2.5", "c": "", "d": "3", "e": "1000.0"}]
