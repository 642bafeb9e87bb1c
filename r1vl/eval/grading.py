"""Grade one benchmark's predictions as VLMEvalKit does: protocol span, verdicts, judge, metrics.

Writes DIR/<Benchmark>/scored.jsonl (per item: the prediction VLMEvalKit receives, what was
read, right or not, judged or pending) and DIR/<Benchmark>/vlmevalkit_predictions.tsv
(VLMEvalKit's prediction file, scorable by VLMEvalKit itself), and returns the benchmark's
result: its metrics, the protocol and the judge behind them, and the counts of everything
that was not scored, so that nothing drops out silently:

- no_image: rows with an empty image, dropped as VLMEvalKit's skip_noimg drops them;
- bad_rows: rows of the file skipped by --skip_bad_rows (reasons listed);
- skipped: items whose prediction line is a skip (an unreadable image met at generation);
- missing: items with no prediction yet (an unfinished run); the metrics then cover only
  the scored items, and the report marks the benchmark incomplete;
- rule_only: items VLMEvalKit would send to its judge, with no --judge given: scored wrong
  in "score" (a lower bound) and right in "score_if_pending_right" (an upper bound);
- judged / judge_failed: items the judge was asked about / whose every try failed;
- unknown_predictions: prediction lines whose index is not in the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

from r1vl.eval import predictions, protocols, vlmevalkit
from r1vl.eval.benchmarks import Benchmark
from r1vl.eval.judge import Judge, JudgeError
from r1vl.eval.tsv import Table
from r1vl.eval.verdicts import Verdict


def _key(prompt: str, temperature: float, system: str | None) -> str:
    return hashlib.sha256(json.dumps([prompt, temperature, system]).encode()).hexdigest()


def _read_judged(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                out[record["key"]] = record["reply"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill (or an older cache): asked again
    return out


class _Asker:
    """The judge as the verdicts' `ask`: cached replies, failures as VLMEvalKit's FAIL_MSG."""

    def __init__(self, judge: Judge, cache_path: Path, log):
        self.judge, self.cache, self.log, self.errors = judge, _read_judged(cache_path), log, []

    def __call__(self, prompt: str, temperature: float, system: str | None) -> str:
        key = _key(prompt, temperature, system)
        if key not in self.cache:
            try:
                self.cache[key] = self.judge(prompt, temperature, system)
            except JudgeError as e:
                self.errors.append(str(e))
                return vlmevalkit.JUDGE_FAILED
            self.log.write(json.dumps({"key": key, "reply": self.cache[key]}, ensure_ascii=False) + "\n")
            self.log.flush()
        return self.cache[key]


def score_benchmark(bench: Benchmark, table: Table, bench_dir: Path, judge: Judge | None = None,
                    protocol: str = "paper", source: Path | None = None, fixes: frozenset = frozenset()) -> dict:
    """The benchmark's result (module docstring); `score` is the paper's column, NaN if nothing
    scored. Predictions come from bench_dir, or from `source` (JSONL, or VLMEvalKit's TSV)."""
    source = source or bench_dir
    if source is not bench_dir and not source.is_file():
        raise ValueError(f"--predictions {source}: no such file")
    preds = predictions.read_all(source) if source.exists() else {}
    counts = dict(items=len(table.items) + len(table.skipped) + len(table.no_image), scored=0,
                  no_image=len(table.no_image), bad_rows=len(table.skipped), skipped=0, missing=0, rule_only=0,
                  judged=0, judge_failed=0, unknown_predictions=0)
    known = {item.index for item in table.items}
    counts["unknown_predictions"] = sum(1 for index in preds if index not in known)
    skip_reasons, rows, scored, sent = [], [], [], {}
    bench_dir.mkdir(parents=True, exist_ok=True)
    with (bench_dir / "judged.jsonl").open("a", encoding="utf-8") if judge else contextlib.nullcontext() as log:
        ask = _Asker(judge, bench_dir / "judged.jsonl", log) if judge else None
        for item in table.items:
            record = preds.get(item.index)
            if record is None:
                counts["missing"] += 1
                continue
            if "skipped" in record:
                counts["skipped"] += 1
                skip_reasons.append(record["skipped"])
                continue
            output = record["prediction"]
            text = output if record.get("vlmevalkit") else protocols.prediction(bench.name, output, protocol, fixes)
            sent[item.index] = text
            verdict: Verdict = bench.score(item, text, ask, fixes)
            counts["rule_only"] += verdict.pending
            counts["judged"] += verdict.judged
            counts["judge_failed"] += verdict.judge_failed
            scored.append((item, verdict))
            rows.append({"index": item.index, "prediction": text, "read": verdict.extracted,
                         "correct": verdict.correct, "pending": verdict.pending, "judged": verdict.judged})
    counts["scored"] = len(scored)
    (bench_dir / "scored.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
    if bench.layout == "tsv":
        predictions.write_vlmevalkit(bench_dir / "vlmevalkit_predictions.tsv", table.items, sent)
    result = bench.aggregate(scored) if scored else {"score": math.nan}
    if counts["rule_only"]:
        upper = [(item, Verdict(v.correct or v.pending)) for item, v in scored]
        result["score_if_pending_right"] = bench.aggregate(upper)["score"]
    judge_name = judge.describe() if judge else "none"
    return {"benchmark": bench.name, "column": bench.column, "file": str(table.path),
            "score": result["score"], "metrics": result, "counts": counts, "protocol": protocol,
            "judge": judge_name if bench.judge != "never" else "not used (rule-based in VLMEvalKit)",
            "fixes": sorted(fixes), "complete": counts["missing"] == 0 and counts["scored"] > 0,
            "no_image": table.no_image[:50], "bad_rows": table.skipped, "skipped": skip_reasons,
            "judge_errors": (ask.errors if ask else [])[:20]}
