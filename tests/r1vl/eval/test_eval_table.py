"""The results table's own row, read back from `python -m r1vl.eval --score-only` (its printed
table, results.md and metrics.json): AVG is the paper's mean of the eight columns only when
every benchmark is complete. Without --judge, the items VLMEvalKit sends to its GPT judge are
left rule-only: such a benchmark's cell is starred and the row has no AVG. With a judge that
answers every such item, the row's AVG is the mean of its cells (MME_sum as percent of 2800).

Only the CLI entry point (r1vl.eval.__main__.main) and the files it writes are used, so the
test does not depend on the names of r1vl.eval's inner modules."""
import json

import pytest
from evalkit_files import png_b64, write_tsv

from r1vl.eval.__main__ import main

COLUMNS = ("MathVista", "MMStar", "Math-V", "ChartQA", "DynaMath", "HallBench", "MathVerse", "MME_sum")
# benchmark -> its column in the table
BENCHES = {"MathVista": "MathVista", "MMStar": "MMStar", "MathVision": "Math-V", "ChartQA": "ChartQA",
           "DynaMath": "DynaMath", "HallusionBench": "HallBench", "MathVerse": "MathVerse", "MME": "MME_sum"}
Q = {"question": "How many red shapes?"}
# Two items per benchmark and a prediction for each. Without a judge some are rule-only, MathVerse's
# always (VLMEvalKit sends every MathVerse item to its judge).
ROWS = {
    "MathVista": [({"index": "1", **Q, "question_type": "free_form", "answer_type": "integer", "answer": "3"}, "3"),
                  ({"index": "2", **Q, "question_type": "multi_choice", "answer_type": "text",
                    "choices": "['3', '4']", "answer": "4", "answer_option": "B"}, "B")],
    "MMStar": [({"index": "0", **Q, "A": "3", "B": "4", "answer": "A"}, "A"),
               ({"index": "1", **Q, "A": "3", "B": "4", "answer": "B"}, "A")],
    "MathVision": [({"index": "1", **Q, "choices": "[]", "answer": "3"}, "3"),
                   ({"index": "2", **Q, "choices": "['3', '4']", "answer": "B"}, "B")],
    "ChartQA": [({"index": "0", **Q, "answer": "3", "split": "human"}, "3"),
                ({"index": "1", **Q, "answer": "blue", "split": "human"}, "red")],
    "DynaMath": [({"index": "0", **Q, "answer_type": "float", "answer": "3.0", "qid": "1", "varid": "0"}, "3.0"),
                 ({"index": "1", **Q, "answer_type": "multiple choice", "answer": "B", "qid": "1", "varid": "1"},
                  "B")],
    "HallusionBench": [({"index": "VS_chart_x_0_0_0", **Q, "answer": "Yes"}, "Yes"),
                       ({"index": "VS_chart_x_0_0_1", **Q, "answer": "No"}, "No")],
    "MathVerse": [({"index": "1", **Q, "answer": "A", "question_type": "multi-choice", "question_for_eval": "q"},
                   "A"),
                  ({"index": "2", **Q, "answer": "3", "question_type": "free-form", "question_for_eval": "q"},
                   "3")],
    # MME's two questions of one image (the second row refers to the first's image)
    "MME": [({"index": "1", "image": png_b64((9, 9, 9)), **Q, "answer": "Yes", "category": "count"}, "Yes"),
            ({"index": "2", "image": "1", **Q, "answer": "No", "category": "count"}, "No")],
}


@pytest.fixture
def bench_args(tmp_path):
    args = []
    for name, rows in ROWS.items():
        tsv = write_tsv(tmp_path / f"{name}.tsv", [row for row, _ in rows])
        predictions = tmp_path / f"{name}.predictions.jsonl"
        predictions.write_text("".join(json.dumps({"index": row["index"],
                                                   "prediction": answer}) + "\n"
                                       for row, answer in rows))
        args += ["--bench", f"{name}={tsv}", "--predictions", f"{name}={predictions}"]
    return args


def _our_row(table: str) -> dict[str, str]:
    """{column: cell} of the table's "(this run)" row, AVG included."""
    head = next(line for line in table.splitlines() if line.startswith("| Model |"))
    row = next(line for line in table.splitlines() if line.startswith("| model (this run) |"))
    names = [c.strip() for c in head.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert names == ["Model", *COLUMNS, "AVG"] and len(cells) == len(names), (head, row)
    return dict(zip(names[1:], cells[1:]))


def _score(tmp_path, bench_args, capsys, *judge) -> tuple[dict[str, str], dict]:
    out = tmp_path / "out"
    assert main(["--score-only", "--out", str(out), "--name", "model", *bench_args, *judge]) == 0
    table = capsys.readouterr().out
    assert (out / "results.md").read_text() == table
    return _our_row(table), json.loads((out / "metrics.json").read_text())


def test_rule_only_benchmark_is_starred_and_leaves_no_avg(tmp_path, bench_args, capsys):
    row, metrics = _score(tmp_path, bench_args, capsys)
    assert metrics["results"]["MathVerse"]["counts"]["rule_only"] == 2
    rule_only = {BENCHES[n] for n, r in metrics["results"].items() if r["counts"].get("rule_only")}
    assert "MathVerse" in rule_only and len(rule_only) < len(COLUMNS)
    assert row["AVG"] == "-", row
    for column in COLUMNS:
        assert row[column] != "-", (column, row)
        assert row[column].endswith("*") == (column in rule_only), (column, row)
    assert metrics["avg"] is None


def test_avg_is_the_mean_of_the_row_when_every_benchmark_is_complete(tmp_path, bench_args, capsys, chat_server):
    # The judge extracts "3" where asked to extract, says the answer is right where asked to
    # judge, and answers "Yes" to a Yes / No matching prompt.
    def reply(prompt: str) -> str:
        if "Yes / No" in prompt:
            return "Yes"
        return "1" if prompt.endswith("Judgement:") else "3"

    server = chat_server(reply)
    row, metrics = _score(tmp_path, bench_args, capsys, "--judge", server.url)
    assert server.requests  # MathVerse's items went to the judge
    results = {BENCHES[n]: r for n, r in metrics["results"].items()}
    assert all(r["complete"] and not r["counts"].get("rule_only") for r in results.values())
    assert not any(cell.endswith("*") for cell in row.values()), row
    scores = [results[c]["score"] / 2800 * 100 if c == "MME_sum" else results[c]["score"] for c in COLUMNS]
    assert max(scores) <= 100 and len(set(scores)) > 1  # the mean is not trivial
    expected = sum(scores) / len(scores)
    assert row["AVG"] == f"{expected:.1f}", (row, scores)
    assert metrics["avg"] == pytest.approx(expected)
    for column in COLUMNS:
        value = results[column]["score"]
        assert row[column] == (f"{value:.0f}" if column == "MME_sum" else f"{value:.1f}"), (column, row)
