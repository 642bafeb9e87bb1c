"""Reading the JSONL files the tests check: a data file's records, a run's metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """Every line of `path` as a dict, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def metrics_records(run_dir: Path, stage: str) -> list[dict]:
    """The metrics records of one stage ("sft" or "grpo") in RUN_DIR/metrics.jsonl, in order."""
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["stage"] == stage]
