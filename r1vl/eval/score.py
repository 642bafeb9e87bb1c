"""Score one benchmark's predictions: extract, match, optionally ask the judge, aggregate.

Writes DIR/<Benchmark>/scored.jsonl (per item: what was read, by which rule, right or not)
and returns the benchmark's result: its metrics and the counts of everything that was not
scored, so that nothing drops out silently:

- bad_rows: rows of the file skipped by --skip_bad_rows (reasons listed);
- skipped: items whose prediction line is a skip (an unreadable image met at generation);
- missing: items with no prediction yet (an unfinished run); the metrics then cover only
  the scored items, and the report marks the benchmark incomplete;
- unparsed: responses whose answer could not be read (scored wrong);
- judged / judge_failed: with --judge, answers read by the judge / calls that failed;
- unknown_predictions: prediction lines whose index is not in the file.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

from r1vl.eval import extract, predictions
from r1vl.eval.benchmarks import Benchmark
from r1vl.eval.judge import Judge, JudgeError
from r1vl.eval.tsv import Table


def _read_judged(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                out[record["index"]] = record["answer"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill: that item is simply asked again
    return out


def score_benchmark(bench: Benchmark, table: Table, bench_dir: Path, judge: Judge | None = None,
                    prompt: str = "r1vl", source: Path | None = None) -> dict:
    """The benchmark's result (module docstring); `score` is the paper's column, NaN if nothing
    scored. Predictions come from bench_dir, or from `source` (a JSONL file) when given."""
    source = source or bench_dir
    if source is not bench_dir and not source.is_file():
        raise ValueError(f"--predictions {source}: no such file")
    preds = predictions.read_all(source) if source.exists() else {}
    counts = dict(items=len(table.items) + len(table.skipped), scored=0, bad_rows=len(table.skipped),
                  skipped=0, missing=0, unparsed=0, judged=0, judge_failed=0, unknown_predictions=0)
    known = {item.index for item in table.items}
    counts["unknown_predictions"] = sum(1 for index in preds if index not in known)
    judged_path = bench_dir / "judged.jsonl"
    judged = _read_judged(judged_path) if judge else {}
    skip_reasons, judge_errors, rows, scored = [], [], [], []
    bench_dir.mkdir(parents=True, exist_ok=True)
    with (judged_path.open("a", encoding="utf-8") if judge else contextlib.nullcontext()) as judge_log:
        for item in table.items:
            record = preds.get(item.index)
            if record is None:
                counts["missing"] += 1
                continue
            if "skipped" in record:
                counts["skipped"] += 1
                skip_reasons.append(record["skipped"])
                continue
            answer, rule = extract.answer_text(record["prediction"])
            outcome = bench.match(item, answer)
            if not outcome.parsed and judge is not None:
                if item.index not in judged:
                    try:
                        judged[item.index] = judge(bench.question(item, prompt), record["prediction"])
                        judge_log.write(json.dumps({"index": item.index, "answer": judged[item.index]}) + "\n")
                        judge_log.flush()
                    except JudgeError as e:
                        counts["judge_failed"] += 1
                        judge_errors.append(f"{item.where()}: {e}")
                if judged.get(item.index) is not None:
                    answer, rule = extract.clean(judged[item.index]), "judge"
                    outcome = bench.match(item, answer)
                    counts["judged"] += outcome.parsed
            counts["unparsed"] += not outcome.parsed
            scored.append((item, outcome))
            rows.append({"index": item.index, "answer": answer, "rule": rule, "read": outcome.extracted,
                         "parsed": outcome.parsed, "correct": outcome.correct})
    counts["scored"] = len(scored)
    (bench_dir / "scored.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
    result = bench.aggregate(scored) if scored else {"score": math.nan}
    return {"benchmark": bench.name, "column": bench.column, "file": str(table.path),
            "score": result["score"], "metrics": result, "counts": counts,
            "complete": counts["missing"] == 0 and counts["scored"] > 0,
            "bad_rows": table.skipped, "skipped": skip_reasons, "judge_errors": judge_errors[:20]}
