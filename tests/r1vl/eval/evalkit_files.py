"""Build small benchmark TSVs in VLMEvalKit's layout for the r1vl.eval tests."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image


def png_b64(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (56, 56)) -> str:
    """A solid-colour PNG, base64-encoded as VLMEvalKit stores images (> 64 characters)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict], image: bool = True) -> Path:
    """One TSV row per dict (the header is the union of the keys in order of appearance);
    rows without an `image` key get a fresh PNG when `image` is set."""
    rows = [({"image": png_b64((40 * i % 256, 80, 120))} if image and "image" not in r else {}) | r
            for i, r in enumerate(rows)]
    header = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            writer.writerow([r.get(k, "") for k in header])
    return path


def write_predictions(bench_dir: Path, predictions: dict[str, str], rank: int = 0) -> None:
    """Hand-written predictions in the form r1vl.eval writes them."""
    bench_dir.mkdir(parents=True, exist_ok=True)
    with (bench_dir / f"predictions.rank{rank}.jsonl").open("a", encoding="utf-8") as f:
        for index, text in predictions.items():
            f.write(json.dumps({"index": index, "prediction": text}) + "\n")


def final(answer: str) -> str:
    """A completion in the R1-VL format whose final answer is `answer`."""
    return ("### Image Description:\nA figure.\n### Rationales:\nRead it.\n### Let's think step by step.\n"
            f"### Step 1:\nLook closely.\n### The final answer is:\n{answer}")
