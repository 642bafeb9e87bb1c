"""Predictions on disk: one JSONL line per item, appended as each batch finishes.

    DIR/<Benchmark>/predictions.rank<R>.jsonl     {"index": "17", "prediction": "...", "tokens": 312, "stopped": true}
                                                  {"index": "18", "skipped": "reason"}

Every rank appends to its own file and flushes after each batch, so a killed evaluation
loses at most the batch in flight; on restart every part is read and only items without a
line are generated (with any number of ranks). A line cut short by the kill is ignored; any
other unreadable line is an error naming the file and line. Predictions made elsewhere can
be scored by putting them in this form (index + prediction) in DIR/<Benchmark>/.

VLMEvalKit's own prediction files are read and written too (`read_vlmevalkit`,
`write_vlmevalkit`): the benchmark's columns without `image`, plus `prediction`, as TSV. Their
predictions are what VLMEvalKit scores (a wrapper's post-processing already applied), so a
protocol's answer span is not applied to them again. VLMEvalKit's default .xlsx needs
openpyxl, which r1vl does not depend on: such a file is refused with the way out (VLMEvalKit
writes TSV with `--pred-format tsv` / PRED_FORMAT=tsv; any spreadsheet can save one).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def part_path(bench_dir: Path, rank: int) -> Path:
    return bench_dir / f"predictions.rank{rank}.jsonl"


def read_all(source: str | Path) -> dict[str, dict]:
    """index -> record, from every predictions*.jsonl in a directory, or from one JSONL file
    (first line wins)."""
    source = Path(source)
    if source.suffix.lower() in (".tsv", ".xlsx"):
        return read_vlmevalkit(source)
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


def read_vlmevalkit(path: str | Path) -> dict[str, dict]:
    """index -> {"index", "prediction", "vlmevalkit": True} from VLMEvalKit's prediction TSV.
    An empty cell reads as 'nan', as VLMEvalKit's str() of pandas' NaN does."""
    path = Path(path)
    if path.suffix.lower() == ".xlsx":
        raise ValueError(f"{path}: .xlsx needs openpyxl, which r1vl does not depend on; have VLMEvalKit write "
                         "TSV (PRED_FORMAT=tsv, or --pred-format tsv), or save the sheet as tab-separated .tsv")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and ("index" not in rows[0] or "prediction" not in rows[0]):
        raise ValueError(f"{path}: a VLMEvalKit prediction file needs the columns 'index' and 'prediction'")
    out: dict[str, dict] = {}
    for row in rows:
        index = str(row["index"]).strip()
        out.setdefault(index, {"index": index, "prediction": row["prediction"] if row["prediction"] != "" else "nan",
                               "vlmevalkit": True})
    return out


def write_vlmevalkit(path: str | Path, items, predictions: dict[str, str]) -> None:
    """VLMEvalKit's prediction file for `items` (r1vl.eval.tsv.Item) that have a prediction:
    every column of the benchmark file but `image`, then `prediction`."""
    rows = [dict(item.fields) | {"prediction": predictions[item.index]} for item in items if item.index in predictions]
    header = list(dict.fromkeys(k for row in rows for k in row if k != "prediction")) + ["prediction"]
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows([row.get(k, "") for k in header] for row in rows)
