"""Results as JSON and as the paper's Table 1, with the paper's own numbers beside.

`write_report(results, out_dir, name)` writes DIR/metrics.json (every benchmark's metrics and
counts) and DIR/results.md: this run's row under the paper's column headers, then the four
rows of the paper's Table 1, quoted, for Qwen2-VL-2B/7B before (the base models) and after
StepGRPO (R1-VL). AVG is the paper's: the mean of the eight columns with MME_sum scaled to
percent of its 2800 maximum; it is given only when all eight are present and complete.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = ("MathVista", "MMStar", "Math-V", "ChartQA", "DynaMath", "HallBench", "MathVerse", "MME_sum")
MME_MAX = 2800.0

# Quoted from the paper (R1-VL, arXiv 2503.12937, Table 1); not measured here.
PAPER = {
    "Qwen2-VL-2B": (43.0, 48.0, 12.4, 73.5, 24.9, 41.7, 19.7, 1872, 41.2),
    "R1-VL-2B": (52.1, 49.8, 17.1, 75.2, 29.4, 44.0, 26.2, 2048, 45.8),
    "Qwen2-VL-7B": (58.2, 60.7, 16.3, 83.0, 42.1, 50.6, 32.5, 2327, 53.3),
    "R1-VL-7B": (63.5, 60.0, 24.7, 83.9, 45.2, 54.7, 40.0, 2376, 57.1),
}


def average(values: dict[str, float]) -> float | None:
    """The paper's AVG over the eight columns; None unless all eight are there."""
    if any(c not in values or not math.isfinite(values[c]) for c in COLUMNS):
        return None
    return sum(values[c] / MME_MAX * 100 if c == "MME_sum" else values[c] for c in COLUMNS) / len(COLUMNS)


def _cell(value: float | None, column: str, complete: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    text = f"{value:.0f}" if column == "MME_sum" else f"{value:.1f}"
    return text if complete else text + "*"


def table(results: list[dict], name: str) -> str:
    """The markdown table (module docstring). A * marks a benchmark scored on part of its file,
    or with items left to a judge that was not given (rule-only)."""
    values = {r["column"]: r["score"] for r in results}
    complete = {r["column"]: r["complete"] and not r["counts"].get("rule_only") for r in results}
    avg = average(values) if all(complete.values()) else None
    head = "| Model | " + " | ".join(COLUMNS) + " | AVG |\n|" + "---|" * (len(COLUMNS) + 2) + "\n"
    ours = f"| {name} (this run) | " + " | ".join(
        _cell(values.get(c), c, complete.get(c, True)) for c in COLUMNS) + f" | {_cell(avg, 'AVG')} |\n"
    quoted = "".join(f"| {model} (paper, quoted) | " + " | ".join(
        _cell(v, c) for v, c in zip(row, (*COLUMNS, "AVG"))) + " |\n" for model, row in PAPER.items())
    notes = []
    for r in results:
        c = r["counts"]
        extra = [f"{k} {c[k]}" for k in ("no_image", "bad_rows", "skipped", "missing", "judged", "judge_failed",
                                          "unknown_predictions") if c.get(k)]
        score = _cell(r["score"], r["column"])
        pending = ""
        if c.get("rule_only"):
            upper = _cell(r["metrics"].get("score_if_pending_right"), r["column"])
            pending = (f"; RULE-ONLY: {c['rule_only']} items VLMEvalKit sends to its judge were not judged "
                       f"(scored wrong; {upper} if all were right)")
        how = f"; protocol {r.get('protocol', '?')}, judge {r.get('judge', 'none')}"
        if r.get("fixes"):
            how += f", fixes {', '.join(r['fixes'])}"
        notes.append(f"- {r['benchmark']} ({r['column']}): {score}; {c['scored']} of {c['items']} items scored"
                     + (f"; {', '.join(extra)}" if extra else "") + pending + how
                     + (" (*incomplete)" if not r["complete"] else ""))
    hall = next((r for r in results if r["benchmark"] == "HallusionBench"), None)
    if hall is not None:
        m = hall["metrics"]
        if "aAcc" in m:
            notes.append(f"- HallBench = mean of aAcc {m['aAcc']:.1f}, fAcc {m['fAcc']:.1f}, qAcc {m['qAcc']:.1f}")
    mme = next((r for r in results if r["benchmark"] == "MME"), None)
    if mme is not None and "perception" in mme["metrics"]:
        m = mme["metrics"]
        notes.append(f"- MME_sum = perception {m['perception']:.1f} + cognition {m['cognition']:.1f}"
                     + (f"; categories missing from the file: {', '.join(m['missing_categories'])}"
                        if m["missing_categories"] else ""))
    return head + ours + quoted + "\n" + "\n".join(notes) + "\n"


def write_report(results: list[dict], out_dir: str | Path, name: str) -> str:
    """Write metrics.json and results.md under out_dir; returns the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = {r["column"]: r["score"] for r in results}
    avg = average(values) if all(r["complete"] and not r["counts"].get("rule_only") for r in results) else None
    payload = {"model": name, "results": {r["benchmark"]: r for r in results},
               "table": {c: values.get(c) for c in COLUMNS}, "avg": avg,
               "paper_quoted": {m: dict(zip((*COLUMNS, "AVG"), row)) for m, row in PAPER.items()}}
    (out_dir / "metrics.json").write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False), encoding="utf-8")
    markdown = table(results, name)
    (out_dir / "results.md").write_text(markdown, encoding="utf-8")
    return markdown


def _json_safe(value):
    """NaN (nothing scored) as null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
