"""Write the built-in synthetic task in three other trainers' layouts, and a tiny checkpoint
that knows their words: what `python train.py --model CKPT --data ...` is tried on.

    python examples/byo_data.py OUT [--n 64]
    python train.py --model OUT/ckpt --data OUT/easyr1.parquet ...        # EasyR1: <image> tags, answer, image bytes
    python train.py --model OUT/ckpt --data OUT/saved ...                 # a datasets save_to_disk directory
    python train.py --model OUT/ckpt --data OUT/trl_two_images.jsonl --max_images 2 ...   # TRL, two images

Each record of the synthetic task (r1vl.data.synthetic) becomes:
- easyr1.parquet: {"problem": "<image>" + question, "answer": final answer, "images": [{"bytes", "path"}]},
  written by pyarrow alone (no `datasets` metadata), as EasyR1's and verl's files are;
- saved/: the same rows as a `datasets.Dataset` with an Image feature, written by save_to_disk;
- trl_two_images.jsonl: a TRL conversational prompt with two {"type": "image"} parts (this
  record's image and the next one's), the question about the first image, "solution", and an
  extra "task" column; the images as files under images/.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path


def write_all(out: Path, n: int, seed: int = 0) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1vl.data.synthetic import make_example
    from r1vl.rewards.rules import reference_answer
    from r1vl.tiny import write_tiny_checkpoint

    (out / "images").mkdir(parents=True, exist_ok=True)
    made = [make_example(seed, i) for i in range(n + 1)]
    pngs = []
    for i, (image, _) in enumerate(made):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        (out / "images" / f"{i:05d}.png").write_bytes(pngs[-1])
    records = [record for _, record in made[:n]]
    answers = [reference_answer(r["solution"]) for r in records]

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "problem": ["<image>" + r["problem"] for r in records],
        "answer": answers,
        "images": pa.array([[{"bytes": png, "path": None}] for png in pngs[:n]], pa.list_(struct)),
    }), out / "easyr1.parquet")

    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict({
        "problem": ["<image>" + r["problem"] for r in records], "answer": answers,
        "images": [[{"bytes": png, "path": None}] for png in pngs[:n]],
    }, features=features).save_to_disk(str(out / "saved"))

    lines = []
    for i, r in enumerate(records):
        question = "Two images. About the first one: " + r["problem"]
        lines.append(json.dumps({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                     {"type": "text", "text": question}]}],
            "images": [f"images/{i:05d}.png", f"images/{i + 1:05d}.png"],
            "solution": r["solution"], "task": r["task"]}))
    (out / "trl_two_images.jsonl").write_text("\n".join(lines) + "\n")

    texts = [r["problem"] for r in records] + [r["solution"] for r in records] + ["Two images. About the first one: "]
    write_tiny_checkpoint(out / "ckpt", texts, seed=seed)
    return {"easyr1": out / "easyr1.parquet", "saved": out / "saved", "trl": out / "trl_two_images.jsonl",
            "ckpt": out / "ckpt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write into")
    parser.add_argument("--n", type=int, default=64, help="records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in write_all(Path(args.out), args.n, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
