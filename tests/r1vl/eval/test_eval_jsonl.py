"""The trainer's own data as a benchmark: the synthetic task's held-out records (R1VL layout)."""
import json

import pytest
from evalkit_files import final, write_predictions

from r1vl.data.synthetic import write_dataset
from r1vl.eval import benchmarks
from r1vl.eval.grading import score_benchmark
from r1vl.eval.tsv import EvalInputError


def test_held_out_records_scored_by_the_trainers_rule(tmp_path):
    data = write_dataset(tmp_path / "syn", n=6, seed=1)
    bench = benchmarks.get("synthetic")
    table = benchmarks.load(bench, data, last=3)  # train.py holds out the last --eval_prompts records
    assert [i.index for i in table.items] == ["3", "4", "5"]
    golds = {i.index: i.fields["answer"] for i in table.items}
    assert table.items[0].fields["question"] and (tmp_path / "syn" / "images").is_dir()
    write_predictions(tmp_path / "out", {"3": final(golds["3"]), "4": final("zzz"),
                                          "5": f"I counted. The answer is {golds['5']}"})
    r = score_benchmark(bench, table, tmp_path / "out")
    assert r["score"] == pytest.approx(200 / 3) and r["complete"]


def test_bad_records(tmp_path):
    data = write_dataset(tmp_path / "syn", n=3, seed=1)
    lines = data.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["image_path"] = "images/none.png"
    data.write_text("\n".join([lines[0], json.dumps(broken), lines[2]]) + "\n")
    with pytest.raises(EvalInputError, match=r"data.jsonl: record 1: image not found"):
        benchmarks.load(benchmarks.get("R1VL"), data)
    table = benchmarks.load(benchmarks.get("R1VL"), data, skip_bad_rows=True)
    assert [i.index for i in table.items] == ["0", "2"] and len(table.skipped) == 1
