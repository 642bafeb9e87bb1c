"""Predictions on disk: one JSONL line per item, appended as each batch finishes.

    DIR/<Benchmark>/predictions.rank<R>.jsonl     {"index": "17", "prediction": "...", "tokens": 312, "stopped": true}
                                                  {"index": "18", "skipped": "reason"}

Every rank appends to its own file and flushes after each batch, so a killed evaluation
loses at most the batch in flight; on restart every part is read and only items without a
line are generated (with any number of ranks). A line cut short by the kill is ignored; any
other unreadable line is an error naming the file and line. Predictions made elsewhere can
be scored by putting them in this form (index + prediction) in DIR/<Benchmark>/.
"""
from __future__ import annotations

import json
from pathlib import Path


def part_path(bench_dir: Path, rank: int) -> Path:
    return bench_dir / f"predictions.rank{rank}.jsonl"


def read_all(source: str | Path) -> dict[str, dict]:
    """index -> record, from every predictions*.jsonl in a directory, or from one JSONL file
    (first line wins)."""
    source = Path(source)
    out: dict[str, dict] = {}
    for path in [source] if source.is_file() else sorted(source.glob("predictions*.jsonl")):
        lines = path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("index"), str):
                    raise ValueError("expected an object with a string 'index'")
                if not isinstance(record.get("prediction", ""), str) or not isinstance(record.get("skipped", ""), str):
                    raise ValueError("'prediction' and 'skipped' must be strings")
                if "prediction" not in record and "skipped" not in record:
                    raise ValueError("neither 'prediction' nor 'skipped'")
            except ValueError as e:
                if number == len(lines):  # the last line, without its newline: cut by a kill
                    break
                raise ValueError(f"{path}: line {number}: unreadable prediction ({e})") from None
            out.setdefault(record["index"], record)
    return out


class Writer:
    """Appends records to this rank's part file; each `write` call is flushed to disk."""

    def __init__(self, bench_dir: str | Path, rank: int) -> None:
        bench_dir = Path(bench_dir)
        bench_dir.mkdir(parents=True, exist_ok=True)
        self.path = part_path(bench_dir, rank)
        self._repair()
        self._file = self.path.open("a", encoding="utf-8")

    def _repair(self) -> None:
        """Drop a partial last line (no newline) left by a kill, so appends start clean."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[:data.rfind(b"\n") + 1])

    def write(self, records: list[dict]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
